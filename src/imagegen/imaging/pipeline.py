"""From a provider's reply (or a stored image) to the bytes to store: the one entry
point, `prepare_output`, and the small helpers built on it."""

from __future__ import annotations

import functools

from imagegen.domain.models import ImageFormat, Size
from imagegen.imaging.codec import Codec, VipsCodec
from imagegen.imaging.header import ImageLimits, read_header
from imagegen.imaging.passthrough import pass_through
from imagegen.imaging.types import EncodeSettings, ImageInfo, Preparation, PreparedImage

PREVIEW_SIDE = 128


@functools.cache
def default_codec() -> Codec:
    """The production codec (libvips), made on first use."""
    return VipsCodec()


def prepare_output(
    data: bytes,
    *,
    target_format: ImageFormat,
    target_size: Size | None,
    limits: ImageLimits,
    encode_settings: EncodeSettings,
    preview_side: int | None = None,
    codec: Codec | None = None,
) -> PreparedImage:
    """The image to store for `data`, in `target_format` and exactly `target_size`
    (None keeps the reply's size).

    The header is read and the limits enforced before anything is decoded. When format
    and size already match, the reply's own bytes are kept after a structural check that
    decodes no pixel (`pass_through`); otherwise the image is decoded once, fitted by
    the cover-crop rule if its size differs, and encoded once. With `preview_side`, a
    small WebP preview comes from that same decode (a pass-through decodes once for it).

    Raises ImageTooLarge (IMG_007) over a limit, ImageDecodeError when the bytes are not
    a whole PNG, JPEG or WebP image.
    """
    codec = codec or default_codec()
    header = read_header(data, limits)
    same_size = target_size is None or (header.width, header.height) == (
        target_size.width,
        target_size.height,
    )
    if same_size and header.format is target_format and header.is_common_still:
        stored = pass_through(data, header)
        preview = None
        if preview_side is not None:
            preview = codec.preview(codec.decode(stored, header), preview_side)
        return PreparedImage(
            stored,
            ImageInfo(header.format, header.format.mime_type, header.width, header.height),
            Preparation.PASSED_THROUGH,
            preview,
        )
    image = codec.decode(data, header)
    preparation = Preparation.CONVERTED
    if not same_size and target_size is not None:
        image = codec.fit(image, target_size.width, target_size.height)
        preparation = Preparation.FITTED
    encoded = codec.encode(image, target_format, encode_settings)
    preview = codec.preview(image, preview_side) if preview_side is not None else None
    return PreparedImage(
        encoded,
        ImageInfo(target_format, target_format.mime_type, image.width, image.height),
        preparation,
        preview,
    )


def convert_image(
    data: bytes,
    target: ImageFormat,
    *,
    max_pixels: int,
    encode_settings: EncodeSettings | None = None,
) -> bytes:
    """`data` in `target`, same size: one decode and one encode, or the same bytes
    (metadata dropped) when they already are `target`."""
    return prepare_output(
        data,
        target_format=target,
        target_size=None,
        limits=ImageLimits(max_pixels=max_pixels),
        encode_settings=encode_settings or EncodeSettings(),
    ).data


def inspect_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> ImageInfo:
    """Prove `data` is a whole PNG/JPEG/WebP image within the limits (every pixel is
    decoded: a source goes to a provider that will decode it), and describe it.
    Raises ImageTooLarge (IMG_007) or ImageDecodeError."""
    header = read_header(data, ImageLimits(max_pixels=max_pixels, max_bytes=max_bytes))
    default_codec().decode(data, header)
    return ImageInfo(header.format, header.format.mime_type, header.width, header.height)


def make_preview_from_bytes(
    data: bytes, max_side: int = PREVIEW_SIDE, *, max_pixels: int = 16_777_216
) -> bytes:
    """A small WebP of an encoded image (checked like any other image first)."""
    header = read_header(data, ImageLimits(max_pixels=max_pixels))
    codec = default_codec()
    return codec.preview(codec.decode(data, header), max_side)
