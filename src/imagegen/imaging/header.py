"""What an encoded image is, read from its first bytes only.

The format is decided by the magic bytes (never by a name or a declared type); the
dimensions come from the PNG IHDR chunk, the JPEG start-of-frame segment or the WebP
VP8 / VP8L / VP8X chunk. The byte and pixel limits are enforced here, before anything
is inflated or decoded, so a decompression bomb (a few kilobytes whose header declares
60000x60000) costs a few microseconds.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from imagegen.domain.errors import ImageTooLarge
from imagegen.domain.models import ImageFormat

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# PNG colour type -> (samples per pixel, allowed bit depths), from the PNG spec §11.2.2.
PNG_COLOUR_TYPES: dict[int, tuple[int, frozenset[int]]] = {
    0: (1, frozenset({1, 2, 4, 8, 16})),
    2: (3, frozenset({8, 16})),
    3: (1, frozenset({1, 2, 4, 8})),
    4: (2, frozenset({8, 16})),
    6: (4, frozenset({8, 16})),
}

# JPEG start-of-frame markers every browser decodes: baseline, extended and progressive
# Huffman. Lossless and arithmetic-coded JPEGs are decoded (and re-encoded) instead.
JPEG_COMMON_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

_VP8X_ANIMATION = 0x02


class ImageDecodeError(ValueError):
    """The bytes are not a whole, well-formed PNG, JPEG or WebP image."""


@dataclass(frozen=True)
class ImageLimits:
    """How large an image may be: pixels (width x height) and, when set, encoded bytes."""

    max_pixels: int
    max_bytes: int | None = None


@dataclass(frozen=True)
class ImageHeader:
    """The facts a header gives without decoding: format, dimensions, and the few
    details that decide whether the bytes can be stored as they are."""

    format: ImageFormat
    width: int
    height: int
    #: PNG: bit depth, colour type, interlace method (0 none, 1 Adam7); else 0
    png_bit_depth: int = 0
    png_colour_type: int = 0
    png_interlace: int = 0
    #: JPEG: the start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...) and
    #: number of components; else 0
    jpeg_frame: int = 0
    jpeg_components: int = 0
    #: WebP: an animation (a still must be decoded to take its first frame)
    animated: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def is_common_still(self) -> bool:
        """Whether every viewer shows these bytes as one still image, so that storing
        them as they are gives what a re-encode would."""
        if self.format is ImageFormat.JPEG:
            return self.jpeg_frame in JPEG_COMMON_FRAMES and self.jpeg_components in (1, 3)
        return not self.animated


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format named by the magic bytes, or None."""
    if data.startswith(PNG_SIGNATURE):
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


def read_header(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Format and dimensions from the header, checked against `limits` (bytes first,
    then pixels). Raises ImageTooLarge (IMG_007) or ImageDecodeError."""
    if limits.max_bytes is not None and len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"the image is {len(data)} bytes; the limit is {limits.max_bytes}",
            metadata={"limit": str(limits.max_bytes)},
        )
    found = sniff_format(data)
    if found is ImageFormat.PNG:
        header = _png_header(data)
    elif found is ImageFormat.JPEG:
        header = _jpeg_header(data)
    elif found is ImageFormat.WEBP:
        header = _webp_header(data)
    else:
        raise ImageDecodeError("the bytes are not a PNG, JPEG or WebP image")
    if header.width <= 0 or header.height <= 0:
        raise ImageDecodeError(f"the {found.value} image has no pixels")
    if header.pixels > limits.max_pixels:
        raise ImageTooLarge(
            f"the image is {header.width}x{header.height} = {header.pixels} pixels; "
            f"the limit is {limits.max_pixels}",
            metadata={
                "limit": str(limits.max_pixels),
                "width": str(header.width),
                "height": str(header.height),
            },
        )
    return header


def _png_header(data: bytes) -> ImageHeader:
    # Signature (8), then IHDR: length (4) = 13, type (4), 13 bytes of data, CRC (4).
    if len(data) < 33:
        raise ImageDecodeError("the PNG image is truncated in its header")
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise ImageDecodeError("the PNG image does not start with its IHDR chunk")
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise ImageDecodeError("the PNG image's IHDR chunk fails its CRC")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(
        ">IIBBBBB", data, 16
    )
    if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
        raise ImageDecodeError("the PNG image declares impossible dimensions")
    allowed = PNG_COLOUR_TYPES.get(colour)
    if allowed is None or depth not in allowed[1]:
        raise ImageDecodeError(f"the PNG image has colour type {colour} at bit depth {depth}")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise ImageDecodeError("the PNG image names an unknown compression, filter or interlace")
    return ImageHeader(
        ImageFormat.PNG,
        width,
        height,
        png_bit_depth=depth,
        png_colour_type=colour,
        png_interlace=interlace,
    )


def _jpeg_header(data: bytes) -> ImageHeader:
    # Walk the marker segments after SOI up to the first start-of-frame.
    position = 2
    size = len(data)
    while True:
        position = _next_marker(data, position)
        if position + 2 > size:
            raise ImageDecodeError("the JPEG image ends before its frame header")
        marker = data[position + 1]
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            raise ImageDecodeError(f"the JPEG image has marker 0x{marker:02X} before its frame")
        if marker == 0xDA:
            raise ImageDecodeError("the JPEG image starts a scan before its frame header")
        if position + 4 > size:
            raise ImageDecodeError("the JPEG image is truncated in a segment header")
        (length,) = struct.unpack_from(">H", data, position + 2)
        if length < 2 or position + 2 + length > size:
            raise ImageDecodeError("the JPEG image is truncated in a segment")
        if marker in JPEG_FRAMES:
            if length < 8:
                raise ImageDecodeError("the JPEG frame header is too short")
            _precision, height, width, components = struct.unpack_from(">BHHB", data, position + 4)
            if height == 0:
                raise ImageDecodeError("the JPEG image declares its height later (DNL)")
            return ImageHeader(
                ImageFormat.JPEG,
                width,
                height,
                jpeg_frame=marker,
                jpeg_components=components,
            )
        position += 2 + length


def _next_marker(data: bytes, position: int) -> int:
    """The position of the next marker's 0xFF (fill bytes 0xFF skipped) at `position`."""
    if position >= len(data) or data[position] != 0xFF:
        raise ImageDecodeError("the JPEG image has bytes where a marker belongs")
    while position + 1 < len(data) and data[position + 1] == 0xFF:
        position += 1
    return position


def _webp_header(data: bytes) -> ImageHeader:
    # RIFF header (12), then the first chunk: FourCC (4), size (4), data.
    kind = data[12:16]
    body = 20
    # VP8X and VP8 carry the dimensions in their first 10 bytes, VP8L in its first 5.
    if len(data) < body + (5 if kind == b"VP8L" else 10):
        raise ImageDecodeError("the WebP image is truncated in its header")
    if kind == b"VP8X":
        flags = data[body]
        width = 1 + int.from_bytes(data[body + 4 : body + 7], "little")
        height = 1 + int.from_bytes(data[body + 7 : body + 10], "little")
        return ImageHeader(ImageFormat.WEBP, width, height, animated=bool(flags & _VP8X_ANIMATION))
    if kind == b"VP8 ":
        if data[body + 3 : body + 6] != b"\x9d\x01\x2a":
            raise ImageDecodeError("the WebP image's VP8 frame has no start code")
        width, height = struct.unpack_from("<HH", data, body + 6)
        return ImageHeader(ImageFormat.WEBP, width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L":
        if data[body] != 0x2F:
            raise ImageDecodeError("the WebP image's VP8L bitstream has no signature")
        (bits,) = struct.unpack_from("<I", data, body + 1)
        if bits >> 29:
            raise ImageDecodeError("the WebP image's VP8L bitstream has an unknown version")
        return ImageHeader(ImageFormat.WEBP, 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    raise ImageDecodeError(f"the WebP image starts with an unknown chunk {kind!r}")
