"""Checking, fitting, converting and previewing encoded images. Pure and synchronous:
callers run these in a worker thread (`asyncio.to_thread`), never on the event loop.

A provider's reply becomes the stored image in one call, `prepare_output`:

1. The header alone is read (`read_header`): the type comes from the magic bytes (only
   PNG, JPEG and WebP), the dimensions from the PNG IHDR, JPEG start-of-frame or WebP
   VP8/VP8L/VP8X chunk. The byte and pixel limits are enforced there, before anything is
   inflated or decoded, so a decompression bomb costs nothing.
2. When the reply already has the asked format and size, its bytes are stored as they
   are, after a structural check that decodes no pixel yet refuses truncated or corrupt
   data (`pass_through`; for PNG the IDAT chunks stay byte-identical).
3. Otherwise it is decoded once, fitted, and encoded once (settings in
   `EncodeSettings`); a preview, when asked for, comes from the same decode.

The fit rule, the same for every provider (proto: the comment of `ImageSize`): the
image is scaled, keeping its aspect ratio, until it covers the asked size, then cropped
to that size around its centre. The output always has the asked dimensions exactly;
nothing is letterboxed and nothing is stretched. JPEG has no transparency: transparent
pixels are laid on white.

The pixel codec is libvips, behind `codec.Codec`; no other module imports it.
"""

from imagegen.imaging.canvas import make_preview
from imagegen.imaging.codec import Codec, DecodedImage, VipsCodec
from imagegen.imaging.fit import CoverCrop, cover_crop
from imagegen.imaging.header import (
    ImageDecodeError,
    ImageHeader,
    ImageLimits,
    read_header,
    sniff_format,
    sniff_mime,
)
from imagegen.imaging.passthrough import pass_through
from imagegen.imaging.pipeline import (
    PREVIEW_SIDE,
    convert_image,
    default_codec,
    inspect_image,
    make_preview_from_bytes,
    prepare_output,
)
from imagegen.imaging.types import EncodeSettings, ImageInfo, Preparation, PreparedImage

__all__ = [
    "PREVIEW_SIDE",
    "Codec",
    "CoverCrop",
    "DecodedImage",
    "EncodeSettings",
    "ImageDecodeError",
    "ImageHeader",
    "ImageInfo",
    "ImageLimits",
    "Preparation",
    "PreparedImage",
    "VipsCodec",
    "convert_image",
    "cover_crop",
    "default_codec",
    "inspect_image",
    "make_preview",
    "make_preview_from_bytes",
    "pass_through",
    "prepare_output",
    "read_header",
    "sniff_format",
    "sniff_mime",
]
