"""The pixel codec: decode, fit, encode and preview with libvips (pyvips).

libvips was chosen by measurement on our workload (bench/codec_bench.py, figures and
reasons in bench/README.md). This is the only module that imports it; everything else
goes through `Codec`, which tests wrap to count decodes and encodes.

Every call is synchronous and CPU-bound: callers run it in a worker thread.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import pyvips

from imagegen.domain.models import ImageFormat
from imagegen.imaging.fit import cover_crop
from imagegen.imaging.header import ImageDecodeError, ImageHeader
from imagegen.imaging.types import EncodeSettings

PREVIEW_QUALITY = 70
_WHITE = [255.0, 255.0, 255.0]
_KEEP_NONE = pyvips.enums.ForeignKeep.NONE
# Each row's filter chosen adaptively, as libpng (and Pillow) do; libvips' default of
# no filter saves a quarter of the CPU for a file ~55 % larger (bench/README.md).
_PNG_ADAPTIVE_FILTER = pyvips.enums.ForeignPngFilter.ALL


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels in memory (8-bit sRGB or grey, with or without alpha)."""

    width: int
    height: int
    pixels: pyvips.Image


class Codec(Protocol):
    """What the pipeline needs from a codec."""

    def decode(self, data: bytes, header: ImageHeader) -> DecodedImage:
        """Every pixel of `data`, whose header was already read and checked against
        the limits. Raises ImageDecodeError when the data does not decode completely."""
        ...

    def fit(self, image: DecodedImage, width: int, height: int) -> DecodedImage:
        """`image` fitted to exactly `width` x `height` by the cover-crop rule."""
        ...

    def encode(self, image: DecodedImage, target: ImageFormat, settings: EncodeSettings) -> bytes:
        """`image` encoded in `target`, without metadata; transparency is laid on white
        for JPEG."""
        ...

    def preview(self, image: DecodedImage, max_side: int) -> bytes:
        """A small WebP of `image`, at most `max_side` pixels on its longer side."""
        ...


@functools.cache
def _configure() -> None:
    # Replies are new bytes every time: the operation cache would only hold memory.
    pyvips.cache_set_max(0)
    # Never let a loader other than PNG/JPEG/WebP (which we call by name) near input.
    pyvips.block_untrusted_set(True)


class VipsCodec:
    """`Codec` on libvips."""

    def __init__(self) -> None:
        _configure()

    def decode(self, data: bytes, header: ImageHeader) -> DecodedImage:
        try:
            image = _load(data, header.format)
            if (image.width, image.height) != (header.width, header.height):
                raise ImageDecodeError("the image decodes to other dimensions than its header")
            image = _to_srgb(image).copy_memory()
        except pyvips.Error as exc:
            raise ImageDecodeError(
                f"the {header.format.value} image does not decode completely: {_first_line(exc)}"
            ) from exc
        return DecodedImage(image.width, image.height, image)

    def fit(self, image: DecodedImage, width: int, height: int) -> DecodedImage:
        box = cover_crop(image.width, image.height, width, height)
        pixels = image.pixels
        alpha = pixels.hasalpha()
        if alpha:
            # Resampling straight alpha darkens edges; resample premultiplied.
            pixels = pixels.premultiply()
        pixels = pixels.resize(
            box.scaled_width / image.width,
            vscale=box.scaled_height / image.height,
            kernel="lanczos3",
        )
        pixels = pixels.crop(box.left, box.top, width, height)
        if alpha:
            pixels = pixels.unpremultiply()
        pixels = pixels.cast("uchar").copy_memory()
        if (pixels.width, pixels.height) != (width, height):  # pragma: no cover - a libvips bug
            raise AssertionError(f"fit gave {pixels.width}x{pixels.height}, not {width}x{height}")
        return DecodedImage(width, height, pixels)

    def encode(self, image: DecodedImage, target: ImageFormat, settings: EncodeSettings) -> bytes:
        pixels = image.pixels
        if target is ImageFormat.JPEG:
            if pixels.hasalpha():
                pixels = pixels.flatten(background=_WHITE if pixels.bands > 2 else _WHITE[:1])
            data: bytes = pixels.jpegsave_buffer(
                Q=settings.jpeg_quality,
                # libjpeg's (and Pillow's) 4:2:0 at every quality; libvips' own "auto"
                # keeps full chroma from Q90 up, for a file ~47 % larger here.
                subsample_mode="on",
                optimize_coding=True,
                keep=_KEEP_NONE,
            )
        elif target is ImageFormat.WEBP:
            data = pixels.webpsave_buffer(
                Q=settings.webp_quality, effort=settings.webp_effort, keep=_KEEP_NONE
            )
        else:
            data = pixels.pngsave_buffer(
                compression=settings.png_compress_level,
                filter=_PNG_ADAPTIVE_FILTER,
                keep=_KEEP_NONE,
            )
        return data

    def preview(self, image: DecodedImage, max_side: int) -> bytes:
        small = image.pixels.thumbnail_image(max_side, height=max_side, size="down", no_rotate=True)
        data: bytes = small.webpsave_buffer(Q=PREVIEW_QUALITY, effort=0, keep=_KEEP_NONE)
        return data


def _load(data: bytes, image_format: ImageFormat) -> pyvips.Image:
    # The loader is named, never sniffed: the bytes were already typed by their header.
    if image_format is ImageFormat.PNG:
        return pyvips.Image.pngload_buffer(data, access="sequential", fail_on="error")
    if image_format is ImageFormat.JPEG:
        return pyvips.Image.jpegload_buffer(data, access="sequential", fail_on="error")
    return pyvips.Image.webpload_buffer(data, access="sequential", fail_on="error")


def _to_srgb(image: pyvips.Image) -> pyvips.Image:
    """8-bit sRGB (or grey), with an embedded colour profile applied, so that every
    encoder gets the colours the source showed."""
    if image.get_typeof("icc-profile-data"):
        image = image.icc_transform("srgb", embedded=True, intent="perceptual")
    grey = image.interpretation in ("b-w", "grey16")
    if image.interpretation not in ("srgb", "b-w") or image.format != "uchar":
        image = image.colourspace("b-w" if grey else "srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def _first_line(exc: pyvips.Error) -> str:
    text = str(exc.detail or exc.message).strip()
    return text.splitlines()[0] if text else "libvips error"
