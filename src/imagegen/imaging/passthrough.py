"""Storing an image as it came, after proving it whole without decoding its pixels.

A re-encode costs tens of milliseconds of CPU per megapixel and gains a file a fraction
of a percent smaller; when a reply already has the asked format and size we keep its
compressed pixel data byte for byte. What we do check, per format:

- PNG: every chunk's length and CRC; IHDR first, IEND last, the IDAT chunks contiguous,
  PLTE where the colour type needs it; the IDAT zlib stream inflated (its Adler-32
  checked) to exactly the raw length the header implies, and, for non-interlaced
  images, every row's filter type byte valid. No row is unfiltered.
- JPEG: the marker walk SOI, segments with their lengths, a frame header before the
  first scan, each scan's entropy-coded data up to the next marker, EOI last.
- WebP: the RIFF length against the bytes, every chunk inside it, one still frame whose
  dimensions match the canvas, the VP8 key frame's first partition inside its chunk.

Metadata is dropped, as a re-encode would drop it: PNG text/EXIF/time/animation and
unknown ancillary chunks, JPEG APP segments other than JFIF, ICC and Adobe (which
decide colours) and comments, WebP EXIF and XMP. Bytes after the image's end marker are
dropped too. Chunks that decide how pixels look (palette, transparency, gamma, colour
profile) are kept. When nothing is dropped the very same bytes are returned.

Why our own code: the codecs only prove an image whole by decoding every pixel (and,
for PNG, the same inflate plus unfiltering and conversion into their pixel buffers);
Pillow's `verify()` checks PNG CRCs but not the zlib stream.
"""

from __future__ import annotations

import struct
import zlib
from typing import cast

from isal import isal_zlib

from imagegen.domain.models import ImageFormat
from imagegen.imaging.header import (
    JPEG_FRAMES,
    PNG_COLOUR_TYPES,
    ImageDecodeError,
    ImageHeader,
)

_PNG_KEPT = frozenset(
    {
        b"IHDR", b"PLTE", b"IDAT", b"IEND",
        # ancillary chunks that change how the pixels are shown
        b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs", b"bKGD",
        b"cICP", b"mDCv", b"cLLi",
    }
)  # fmt: skip
_PNG_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
# Adam7 passes: (first column, first row, column step, row step), PNG spec §8.2.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # fmt: skip
_INFLATE_STEP = 256 * 1024
# isal's stubs declare its error class as an instance
_INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)

_JPEG_KEPT_APP = frozenset({0xE0, 0xE2, 0xEE})  # JFIF, ICC_PROFILE, Adobe (colour transform)
_JPEG_TABLES = frozenset({0xC4, 0xCC, 0xDB, 0xDD, 0xDC})  # DHT, DAC, DQT, DRI, DNL

_VP8X_ICC, _VP8X_ALPHA, _VP8X_EXIF, _VP8X_XMP = 0x20, 0x10, 0x08, 0x04


def pass_through(data: bytes, header: ImageHeader) -> bytes:
    """Prove `data` whole without decoding its pixels and return it as it is to be
    stored (metadata and trailing bytes dropped, compressed pixels untouched).
    `header` is `read_header(data, ...)`. Raises ImageDecodeError."""
    if header.format is ImageFormat.PNG:
        return _png(data, header)
    if header.format is ImageFormat.JPEG:
        return _jpeg(data)
    return _webp(data, header)


# --- PNG ----------------------------------------------------------------------------


def png_raw_length(header: ImageHeader) -> int:
    """Bytes of the filtered scanlines (one filter byte per row) the IDAT stream holds."""
    samples, _ = PNG_COLOUR_TYPES[header.png_colour_type]
    bits_per_pixel = samples * header.png_bit_depth

    def rows(width: int, height: int) -> int:
        if width <= 0 or height <= 0:
            return 0
        return height * (1 + (width * bits_per_pixel + 7) // 8)

    if header.png_interlace == 0:
        return rows(header.width, header.height)
    return sum(
        rows(-(-(header.width - x0) // dx), -(-(header.height - y0) // dy))
        for x0, y0, dx, dy in _ADAM7
    )


class _IdatStream:
    """Inflates IDAT data as it comes, counting (not keeping) the output."""

    def __init__(self, header: ImageHeader) -> None:
        # ISA-L inflates (and checks the Adler-32) about twice as fast as zlib; the
        # inflate is nearly all of a pass-through's cost (bench/README.md).
        self._inflater = isal_zlib.decompressobj()
        self._expected = png_raw_length(header)
        self._produced = 0
        # Without interlacing every row starts with its filter type byte at a fixed
        # stride; with Adam7 the strides change per pass, which is not worth following.
        self._stride = self._expected // header.height if header.png_interlace == 0 else 0

    def feed(self, chunk: memoryview) -> None:
        pending: bytes | memoryview = chunk
        try:
            while True:
                out = self._inflater.decompress(pending, _INFLATE_STEP)
                self._count(out)
                pending = self._inflater.unconsumed_tail
                if not pending and len(out) < _INFLATE_STEP:
                    break
        except _INFLATE_ERROR as exc:
            raise ImageDecodeError(f"the PNG image's pixel data is corrupt: {exc}") from exc
        if self._inflater.unused_data:
            raise ImageDecodeError("the PNG image has data after its pixel stream")

    def _count(self, out: bytes) -> None:
        if not out:
            return
        if self._produced + len(out) > self._expected:
            raise ImageDecodeError("the PNG image's pixel data is longer than its header says")
        if self._stride:
            first = -self._produced % self._stride
            filter_types = out[first :: self._stride]
            if filter_types and max(filter_types) > 4:
                raise ImageDecodeError("the PNG image has a row with an unknown filter type")
        self._produced += len(out)

    def finish(self) -> None:
        if not self._inflater.eof:
            raise ImageDecodeError("the PNG image's pixel data is truncated")
        if self._produced != self._expected:
            raise ImageDecodeError(
                f"the PNG image's pixel data is {self._produced} bytes; "
                f"its header implies {self._expected}"
            )


def _png(data: bytes, header: ImageHeader) -> bytes:
    view = memoryview(data)
    size = len(data)
    position = 8
    kept: list[tuple[int, int]] = []
    dropped = False
    idat_state = 0  # 0 before IDAT, 1 inside the IDAT run, 2 after it
    seen_palette = False
    stream = _IdatStream(header)
    while True:
        if position + 12 > size:
            raise ImageDecodeError("the PNG image is truncated (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        if length > 0x7FFFFFFF or end > size:
            raise ImageDecodeError(f"the PNG image is truncated in its {kind!r} chunk")
        if not kind.isalpha() or not kind.isascii():
            raise ImageDecodeError(f"the PNG image has a chunk with the bad type {kind!r}")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[position + 4 : end - 4]) != crc:
            raise ImageDecodeError(f"the PNG image's {kind.decode()} chunk fails its CRC")
        if position == 8 and kind != b"IHDR":
            raise ImageDecodeError("the PNG image does not start with its IHDR chunk")
        if kind == b"IHDR" and position != 8:
            raise ImageDecodeError("the PNG image has a second IHDR chunk")
        if kind == b"IDAT":
            if idat_state == 2:
                raise ImageDecodeError("the PNG image's IDAT chunks are not contiguous")
            idat_state = 1
            stream.feed(view[position + 8 : end - 4])
        elif idat_state == 1:
            idat_state = 2
        if kind == b"PLTE":
            if idat_state or seen_palette or header.png_colour_type in (0, 4):
                raise ImageDecodeError("the PNG image has a misplaced PLTE chunk")
            seen_palette = True
        if kind[:1].isupper() and kind not in _PNG_CRITICAL:
            raise ImageDecodeError(f"the PNG image has an unknown critical chunk {kind!r}")
        if kind in _PNG_KEPT:
            kept.append((position, end))
        else:
            dropped = True
        position = end
        if kind == b"IEND":
            if length:
                raise ImageDecodeError("the PNG image's IEND chunk is not empty")
            break
    if idat_state == 0:
        raise ImageDecodeError("the PNG image has no pixel data (IDAT)")
    if header.png_colour_type == 3 and not seen_palette:
        raise ImageDecodeError("the palette PNG image has no PLTE chunk")
    stream.finish()
    if not dropped and position == size:
        return data
    return data[:8] + b"".join(view[start:end] for start, end in kept)


# --- JPEG ---------------------------------------------------------------------------


def _jpeg(data: bytes) -> bytes:
    view = memoryview(data)
    size = len(data)
    kept: list[tuple[int, int]] = [(0, 2)]
    dropped = False
    seen_frame = seen_scan = False
    position = 2
    while True:
        if position >= size:
            raise ImageDecodeError("the JPEG image is truncated (no EOI marker)")
        if data[position] != 0xFF:
            raise ImageDecodeError("the JPEG image has bytes where a marker belongs")
        while position + 1 < size and data[position + 1] == 0xFF:
            position += 1  # fill bytes
        if position + 1 >= size:
            raise ImageDecodeError("the JPEG image is truncated (no EOI marker)")
        marker = data[position + 1]
        if marker == 0xD9:
            if not seen_scan:
                raise ImageDecodeError("the JPEG image ends before any scan")
            kept.append((position, position + 2))
            position += 2
            break
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            raise ImageDecodeError(f"the JPEG image has a stray marker 0x{marker:02X}")
        if position + 4 > size:
            raise ImageDecodeError("the JPEG image is truncated in a segment header")
        (length,) = struct.unpack_from(">H", data, position + 2)
        end = position + 2 + length
        if length < 2 or end > size:
            raise ImageDecodeError("the JPEG image is truncated in a segment")
        if marker in JPEG_FRAMES:
            if seen_frame:
                raise ImageDecodeError("the JPEG image has a second frame header")
            seen_frame = True
            kept.append((position, end))
        elif marker == 0xDA:
            if not seen_frame:
                raise ImageDecodeError("the JPEG image starts a scan before its frame header")
            components = data[position + 4] if length > 2 else 0
            if not 1 <= components <= 4 or length != 6 + 2 * components:
                raise ImageDecodeError("the JPEG image has a malformed scan header")
            end = _entropy_end(data, end)
            seen_scan = True
            kept.append((position, end))
        elif marker in _JPEG_TABLES or (marker in _JPEG_KEPT_APP and _kept_app(data, position)):
            kept.append((position, end))
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            dropped = True  # metadata (EXIF, XMP, IPTC, comments, ...)
        else:
            raise ImageDecodeError(f"the JPEG image has an unknown marker 0x{marker:02X}")
        position = end
    if not dropped and position == size:
        return data
    return b"".join(view[start:end] for start, end in kept)


def _kept_app(data: bytes, position: int) -> bool:
    if data[position + 1] == 0xE2:
        return data[position + 4 : position + 16] == b"ICC_PROFILE\x00"
    return True


def _entropy_end(data: bytes, position: int) -> int:
    """Where a scan's entropy-coded data ends: the next 0xFF that is neither a stuffed
    zero, a restart marker nor a fill byte."""
    size = len(data)
    while True:
        found = data.find(b"\xff", position)
        if found < 0 or found + 1 >= size:
            raise ImageDecodeError("the JPEG image is truncated in its scan data")
        following = data[found + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            position = found + 2
        elif following == 0xFF:
            position = found + 1
        else:
            return found


# --- WebP ---------------------------------------------------------------------------


def _webp(data: bytes, header: ImageHeader) -> bytes:
    (riff_size,) = struct.unpack_from("<I", data, 4)
    declared_end = 8 + riff_size
    if declared_end > len(data):
        raise ImageDecodeError("the WebP image is truncated (shorter than its RIFF size)")
    view = memoryview(data)
    chunks: list[tuple[bytes, int, int]] = []  # (FourCC, start, end incl. padding)
    position = 12
    while position < declared_end:
        if position + 8 > declared_end:
            raise ImageDecodeError("the WebP image is truncated in a chunk header")
        kind = data[position : position + 4]
        (length,) = struct.unpack_from("<I", data, position + 4)
        end = position + 8 + length + (length & 1)
        if end > declared_end:
            raise ImageDecodeError(f"the WebP image is truncated in its {kind!r} chunk")
        chunks.append((kind, position, end))
        position = end
    if not chunks:
        raise ImageDecodeError("the WebP image has no chunks")
    kinds = [kind for kind, _, _ in chunks]
    frames = [c for c in chunks if c[0] in (b"VP8 ", b"VP8L")]
    if len(frames) != 1 or b"ANMF" in kinds or b"ANIM" in kinds:
        raise ImageDecodeError("the WebP image is not one still frame")
    frame_kind, frame_start, _ = frames[0]
    (frame_length,) = struct.unpack_from("<I", data, frame_start + 4)
    width, height = _webp_frame_size(view[frame_start + 8 : frame_start + 8 + frame_length],
                                     frame_kind)  # fmt: skip
    if (width, height) != (header.width, header.height):
        raise ImageDecodeError("the WebP image's frame does not match its canvas")
    if kinds[0] != b"VP8X":
        # Simple format: the frame is the file; anything after it is not part of it.
        kept = [frames[0]]
        flags = -1
    else:
        if kinds.count(b"ALPH") > 1 or (b"ALPH" in kinds and frame_kind != b"VP8 "):
            raise ImageDecodeError("the WebP image has a misplaced ALPH chunk")
        kept = [c for c in chunks if c[0] in (b"VP8X", b"ICCP", b"ALPH", b"VP8 ", b"VP8L")]
        flags = data[20]
    if len(kept) == len(chunks) and declared_end == len(data):
        return data
    body = bytearray()
    for kind, start, end in kept:
        body += view[start:end]
        if kind == b"VP8X":
            # The flags must not promise the EXIF or XMP chunk that is dropped.
            body[8] = flags & ~(_VP8X_EXIF | _VP8X_XMP)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + bytes(body)


def _webp_frame_size(frame: memoryview, kind: bytes) -> tuple[int, int]:
    if kind == b"VP8L":
        if len(frame) < 5 or frame[0] != 0x2F:
            raise ImageDecodeError("the WebP image's VP8L bitstream is malformed")
        (bits,) = struct.unpack_from("<I", frame, 1)
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if len(frame) < 10 or bytes(frame[3:6]) != b"\x9d\x01\x2a":
        raise ImageDecodeError("the WebP image's VP8 frame is malformed")
    tag = frame[0] | frame[1] << 8 | frame[2] << 16
    first_partition = tag >> 5
    if tag & 1 or first_partition > len(frame) - 10:
        raise ImageDecodeError("the WebP image's VP8 frame is not a whole key frame")
    width, height = struct.unpack_from("<HH", frame, 6)
    return width & 0x3FFF, height & 0x3FFF
