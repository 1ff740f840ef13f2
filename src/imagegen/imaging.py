"""Checking, converting and previewing encoded images. Pure and synchronous:
callers run these in a worker thread (`asyncio.to_thread`), never on the event loop.

The type of an image is decided by its bytes, never by a name or a header; only PNG,
JPEG and WebP are accepted; the pixel limit is checked on the header, before any
pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from imagegen.domain.errors import ImageTooLarge
from imagegen.domain.models import ImageFormat

_PIL_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}
_FROM_PIL = {v: k for k, v in _PIL_FORMATS.items()}


class ImageDecodeError(ValueError):
    """The bytes are not a PNG, JPEG or WebP image that decodes completely."""


@dataclass(frozen=True)
class ImageInfo:
    """What the bytes turned out to be."""

    format: ImageFormat
    mime_type: str
    width: int
    height: int


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format named by the magic bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageFormat.PNG
    if data.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    return None


def sniff_mime(data: bytes) -> str:
    """MIME type by magic bytes; empty when unknown."""
    found = sniff_format(data)
    return found.mime_type if found else ""


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    found = sniff_format(data)
    if found is None:
        raise ImageDecodeError("the bytes are not a PNG, JPEG or WebP image")
    with warnings.catch_warnings():
        # Pillow's own bomb check is a warning below 2x its limit; ours comes first
        # anyway, but never let a warning pass silently.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[found]])
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"the image is too large to decode ({exc})") from exc
        except Image.DecompressionBombWarning as exc:
            raise ImageTooLarge(f"the image is too large to decode ({exc})") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"the {found.value} image is corrupt: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("the image has no pixels")
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            metadata={"limit": str(max_pixels), "width": str(width), "height": str(height)},
        )
    return image


def inspect_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> ImageInfo:
    """Prove `data` is a whole PNG/JPEG/WebP image within the limits, and describe it.
    Raises ImageTooLarge (IMG_007) or ImageDecodeError."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(
            f"the image is {len(data)} bytes; the limit is {max_bytes}",
            metadata={"limit": str(max_bytes)},
        )
    image = _open(data, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"the image does not decode completely: {exc}") from exc
    finally:
        image.close()
    found = _FROM_PIL[str(image.format)]
    return ImageInfo(found, found.mime_type, image.width, image.height)


def convert_image(data: bytes, target: ImageFormat, *, max_pixels: int) -> bytes:
    """Re-encode in `target`, always (so metadata such as EXIF and text chunks is dropped).
    JPEG has no transparency: transparent pixels are laid on white."""
    image = _open(data, max_pixels=max_pixels)
    try:
        image.load()
        return encode(image, target)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"the image does not decode completely: {exc}") from exc
    finally:
        image.close()


def encode(image: Image.Image, target: ImageFormat) -> bytes:
    """Encode a decoded image with fixed settings (deterministic output)."""
    out = io.BytesIO()
    if target is ImageFormat.JPEG:
        rgb = _flatten(image)
        rgb.save(out, format="JPEG", quality=90, optimize=True)
    elif target is ImageFormat.WEBP:
        converted = image if image.mode in ("RGB", "RGBA") else image.convert("RGBA")
        converted.save(out, format="WEBP", quality=90, method=4)
    else:
        converted = (
            image if image.mode in ("RGB", "RGBA", "L", "LA", "P") else image.convert("RGBA")
        )
        converted.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def _flatten(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def make_preview(image: Image.Image, max_side: int = 128) -> bytes:
    """A small WebP of `image`, at most `max_side` pixels on its longer side."""
    preview = image.copy()
    preview.thumbnail((max_side, max_side))
    out = io.BytesIO()
    preview.convert("RGB").save(out, format="WEBP", quality=70, method=0)
    return out.getvalue()


def make_preview_from_bytes(
    data: bytes, max_side: int = 128, *, max_pixels: int = 16_777_216
) -> bytes:
    """A small WebP of an encoded image (checked like any other image first)."""
    image = _open(data, max_pixels=max_pixels)
    try:
        image.load()
        return make_preview(image, max_side)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"the preview does not decode: {exc}") from exc
    finally:
        image.close()
