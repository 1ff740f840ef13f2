"""The checks that decode no pixel: headers and limits (bombs cost nothing), and the
structural check of a pass-through, which keeps the compressed pixels byte for byte
and refuses truncated or corrupt PNG, JPEG and WebP data."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from imagegen.domain.errors import ImageTooLarge
from imagegen.imaging import (
    ImageDecodeError,
    ImageLimits,
    pass_through,
    read_header,
)
from imagegen.imaging.passthrough import png_raw_length
from tests.fakes.forge_server import bomb_png

LIMITS = ImageLimits(max_pixels=16_777_216)


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Deterministic content with detail in every channel (not flat colour)."""
    layers = [
        Image.linear_gradient("L").resize((width, height)),
        Image.effect_mandelbrot((width, height), (-2.0, -1.2, 0.8, 1.2), 40),
        Image.radial_gradient("L").resize((width, height)),
    ]
    rgb = Image.merge("RGB", layers)
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").rotate(90).resize((width, height)))
        return rgba
    return rgb.convert(mode)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, in order."""
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack_from(">I", data, position)
        kind = data[position + 4 : position + 8]
        chunks.append((kind, data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    value = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", value)


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(k, b) for k, b in chunks)


def idat_of(data: bytes) -> list[bytes]:
    return [body for kind, body in png_chunks(data) if kind == b"IDAT"]


def checked(data: bytes) -> bytes:
    return pass_through(data, read_header(data, LIMITS))


def pixels_of(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGBA").tobytes()


# --- headers and limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_dimensions_come_from_the_header(fmt: str, options: dict[str, object]) -> None:
    header = read_header(encode(picture(37, 23), fmt, **options), LIMITS)
    assert header.format.value == fmt.lower()
    assert (header.width, header.height) == (37, 23)


@pytest.mark.parametrize("options", [{"lossless": True}, {}])
def test_the_smallest_webp_passes(options: dict[str, object]) -> None:
    data = encode(Image.new("RGB", (1, 1)), "WEBP", **options)
    assert checked(data) is data


def test_webp_extended_header_with_alpha() -> None:
    data = encode(picture(41, 19, "RGBA"), "WEBP")
    assert data[12:16] == b"VP8X"
    assert (read_header(data, LIMITS).width, read_header(data, LIMITS).height) == (41, 19)


@pytest.mark.parametrize(
    "data",
    [encode(picture(8, 8), "GIF"), encode(picture(8, 8), "BMP"), b"", b"not an image"],
)
def test_other_formats_and_garbage_are_refused(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        read_header(data, LIMITS)


def test_limits_at_and_past_their_edges() -> None:
    data = encode(picture(100, 100), "PNG")
    assert read_header(data, ImageLimits(max_pixels=10_000, max_bytes=len(data))).width == 100
    with pytest.raises(ImageTooLarge) as too_many:
        read_header(data, ImageLimits(max_pixels=9_999))
    assert too_many.value.metadata == {"limit": "9999", "width": "100", "height": "100"}
    with pytest.raises(ImageTooLarge):
        read_header(data, ImageLimits(max_pixels=10_000, max_bytes=len(data) - 1))


def jpeg_bomb(side: int) -> bytes:
    """A valid-looking JPEG header declaring side x side pixels."""
    data = encode(picture(16, 16), "JPEG")
    position = 2
    while data[position + 1] not in (0xC0, 0xC2):
        position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    patched = bytearray(data)
    struct.pack_into(">HH", patched, position + 5, side, side)
    return bytes(patched)


def webp_bomb() -> bytes:
    """A VP8X canvas of 16384x16384 around a 16x16 frame."""
    vp8x = struct.pack("<B3x", 0) + (16383).to_bytes(3, "little") * 2
    frame = encode(picture(16, 16), "WEBP")[12:]
    body = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


@pytest.mark.parametrize(
    "bomb",
    [bomb_png(60000), jpeg_bomb(65000), webp_bomb()],
    ids=["png-60000", "jpeg-65000", "webp-16384"],
)
def test_bombs_are_refused_from_their_header(bomb: bytes) -> None:
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLarge):
        read_header(bomb, ImageLimits(max_pixels=16_777_216))


# --- PNG pass-through -----------------------------------------------------------------


def test_a_plain_png_is_passed_through_as_the_same_bytes() -> None:
    data = encode(picture(64, 48), "PNG")
    assert checked(data) is data


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "I;16"])
def test_raw_length_matches_what_the_encoder_wrote(mode: str) -> None:
    # odd widths exercise the sub-byte rows of 1-bit and 4-bit images
    data = encode(picture(37, 13, mode if mode != "I;16" else "L").convert(mode), "PNG")
    assert checked(data) is data
    header = read_header(data, LIMITS)
    assert len(zlib.decompress(b"".join(idat_of(data)))) == png_raw_length(header)


def test_a_four_bit_palette_png_passes() -> None:
    data = encode(picture(29, 7).convert("P", colors=16), "PNG", bits=4)
    assert read_header(data, LIMITS).png_bit_depth == 4
    assert checked(data) is data


def test_an_interlaced_png_passes() -> None:
    from imagegen.imaging import VipsCodec

    codec = VipsCodec()
    source = encode(picture(45, 31), "PNG")
    decoded = codec.decode(source, read_header(source, LIMITS))
    interlaced = decoded.pixels.pngsave_buffer(interlace=True, keep=0)
    assert read_header(interlaced, LIMITS).png_interlace == 1
    assert checked(interlaced) is interlaced


def test_metadata_is_dropped_and_idat_stays_identical() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt the provider wrote into the file")
    info.add_itxt("Comment", "more")
    data = encode(
        picture(64, 48), "PNG", pnginfo=info, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"
    )
    kinds = [kind for kind, _ in png_chunks(data)]
    assert b"tEXt" in kinds and b"iTXt" in kinds and b"eXIf" in kinds
    stored = checked(data)
    assert [kind for kind, _ in png_chunks(stored)] == [b"IHDR", b"IDAT", b"IEND"]
    assert idat_of(stored) == idat_of(data)
    assert pixels_of(stored) == pixels_of(data)


def test_colour_chunks_are_kept() -> None:
    data = encode(picture(16, 16, "RGBA").convert("P"), "PNG", transparency=0, gamma=0.45)
    kinds = [kind for kind, _ in png_chunks(data)]
    assert {b"PLTE", b"tRNS"} <= set(kinds)
    assert checked(data) is data


def test_an_animated_png_keeps_its_still_image() -> None:
    frames = [picture(32, 32), picture(32, 32).rotate(90)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], default_image=True)
    assert b"acTL" in [kind for kind, _ in png_chunks(data)]
    stored = checked(data)
    assert [kind for kind, _ in png_chunks(stored)] == [b"IHDR", b"IDAT", b"IEND"]
    assert pixels_of(stored) == frames[0].convert("RGBA").tobytes()


def test_bytes_after_iend_are_dropped() -> None:
    data = encode(picture(16, 16), "PNG")
    assert checked(data + b"PK\x03\x04 a zip someone appended") == data


def _truncations(data: bytes) -> list[bytes]:
    return [data[:cut] for cut in (40, len(data) // 2, len(data) - 13, len(data) - 1)]


def _png_mutations() -> dict[str, bytes]:
    data = encode(picture(64, 48), "PNG", compress_level=1)
    chunks = png_chunks(data)
    ihdr, idat = chunks[0], b"".join(idat_of(data))
    flipped = bytearray(idat)
    flipped[len(flipped) // 2] ^= 0x20
    half = len(idat) // 2
    wrong_filter = zlib.compress(bytes([7]) + zlib.decompress(idat)[1:])
    short_stream = zlib.compress(zlib.decompress(idat)[:-1])
    long_stream = zlib.compress(zlib.decompress(idat) + b"\x00")
    return {
        "flipped byte in IDAT (CRC fixed)": build_png(
            [ihdr, (b"IDAT", bytes(flipped)), (b"IEND", b"")]
        ),
        "bad CRC": data[:-1] + bytes([data[-1] ^ 1]),
        "bad CRC in IDAT": b"\x89PNG\r\n\x1a\n"
        + chunk(*ihdr)
        + chunk(b"IDAT", idat, crc=zlib.crc32(b"IDAT" + idat) ^ 1)
        + chunk(b"IEND", b""),
        "missing IEND": data[:-12],
        "no IDAT": build_png([ihdr, (b"IEND", b"")]),
        "IDAT not contiguous": build_png(
            [
                ihdr,
                (b"IDAT", idat[:half]),
                (b"tEXt", b"k\x00v"),
                (b"IDAT", idat[half:]),
                (b"IEND", b""),
            ]
        ),
        "stream cut inside IDAT": build_png([ihdr, (b"IDAT", idat[:-6]), (b"IEND", b"")]),
        "stream shorter than the header": build_png(
            [ihdr, (b"IDAT", short_stream), (b"IEND", b"")]
        ),
        "stream longer than the header": build_png([ihdr, (b"IDAT", long_stream), (b"IEND", b"")]),
        "data after the stream": build_png([ihdr, (b"IDAT", idat + b"junk"), (b"IEND", b"")]),
        "unknown filter type": build_png([ihdr, (b"IDAT", wrong_filter), (b"IEND", b"")]),
        "unknown critical chunk": build_png(
            [ihdr, (b"ABCD", b""), (b"IDAT", idat), (b"IEND", b"")]
        ),
        "second IHDR": build_png([ihdr, ihdr, (b"IDAT", idat), (b"IEND", b"")]),
        "non-empty IEND": build_png([ihdr, (b"IDAT", idat), (b"IEND", b"x")]),
        "palette image without PLTE": build_png(
            [
                (b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 3, 0, 0, 0)),
                *[(b"IDAT", body) for body in idat_of(encode(picture(64, 48, "L"), "PNG"))],
                (b"IEND", b""),
            ]
        ),
        "bad chunk type": build_png([ihdr, (b"ID@T", idat), (b"IEND", b"")]),
        **{f"truncated #{n}": cut for n, cut in enumerate(_truncations(data))},
    }


@pytest.mark.parametrize(("name", "data"), _png_mutations().items(), ids=list(_png_mutations()))
def test_corrupt_or_truncated_png_is_refused(name: str, data: bytes) -> None:
    assert data, name
    with pytest.raises(ImageDecodeError):
        checked(data)


def test_bad_crc_in_ihdr_is_refused_by_the_header() -> None:
    data = bytearray(encode(picture(8, 8), "PNG"))
    data[20] ^= 1  # inside IHDR's width
    with pytest.raises(ImageDecodeError):
        read_header(bytes(data), LIMITS)


# --- JPEG pass-through ----------------------------------------------------------------


def jpeg_segments(data: bytes) -> list[int]:
    """The markers before the first scan."""
    markers, position = [], 2
    while data[position + 1] != 0xDA:
        markers.append(data[position + 1])
        position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    return markers


@pytest.mark.parametrize("progressive", [False, True])
def test_a_plain_jpeg_is_passed_through_as_the_same_bytes(progressive: bool) -> None:
    data = encode(picture(64, 48), "JPEG", progressive=progressive)
    assert checked(data) is data


def test_jpeg_metadata_is_dropped_and_the_scans_stay_identical() -> None:
    image = picture(64, 48)
    exif = image.getexif()
    exif[0x010E] = "a description"
    data = encode(image, "JPEG", exif=exif.tobytes(), comment=b"a comment", icc_profile=b"x" * 40)
    assert {0xE1, 0xFE, 0xE2} <= set(jpeg_segments(data))
    stored = checked(data)
    markers = jpeg_segments(stored)
    assert 0xE1 not in markers and 0xFE not in markers
    assert 0xE2 in markers  # the colour profile decides how the pixels look
    scan = data[data.index(b"\xff\xda") :]
    assert stored.endswith(scan)


def _jpeg_mutations() -> dict[str, bytes]:
    data = encode(picture(64, 48), "JPEG")
    sos = data.index(b"\xff\xda")
    first_segment = bytearray(data)
    first_segment[5] = 0xFF  # length of the first segment (APP0) now runs past the end
    bad_scan = bytearray(data)
    bad_scan[sos + 4] = 9  # nine components in the scan header
    return {
        "missing EOI": data[:-2],
        "segment length past the end": bytes(first_segment),
        "malformed scan header": bytes(bad_scan),
        "scan before the frame": data[:2] + data[sos:],
        "stray restart marker": data[:sos] + b"\xff\xd3" + data[sos:],
        "second SOI": data[:sos] + b"\xff\xd8" + data[sos:],
        **{f"truncated #{n}": cut for n, cut in enumerate(_truncations(data))},
    }


@pytest.mark.parametrize(("name", "data"), _jpeg_mutations().items(), ids=list(_jpeg_mutations()))
def test_corrupt_or_truncated_jpeg_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        checked(data)


def test_bytes_after_eoi_are_dropped() -> None:
    data = encode(picture(16, 16), "JPEG")
    assert checked(data + b"trailing") == data


# --- WebP pass-through ----------------------------------------------------------------


def riff_chunks(data: bytes) -> list[bytes]:
    kinds, position = [], 12
    while position < len(data):
        kinds.append(data[position : position + 4])
        (length,) = struct.unpack_from("<I", data, position + 4)
        position += 8 + length + (length & 1)
    return kinds


@pytest.mark.parametrize(
    ("mode", "options"), [("RGB", {}), ("RGB", {"lossless": True}), ("RGBA", {})]
)
def test_a_plain_webp_is_passed_through_as_the_same_bytes(
    mode: str, options: dict[str, object]
) -> None:
    data = encode(picture(64, 48, mode), "WEBP", **options)
    assert checked(data) is data


def test_webp_metadata_is_dropped_and_its_flags_follow() -> None:
    image = picture(64, 48, "RGBA")
    exif = image.getexif()
    exif[0x010E] = "a description"
    data = encode(image, "WEBP", exif=exif.tobytes(), xmp=b"<x:xmpmeta/>")
    assert {b"EXIF", b"XMP "} <= set(riff_chunks(data))
    stored = checked(data)
    assert riff_chunks(stored) == [
        kind for kind in riff_chunks(data) if kind not in (b"EXIF", b"XMP ")
    ]
    assert stored[20] & 0x0C == 0  # neither EXIF nor XMP promised any more
    assert struct.unpack_from("<I", stored, 4)[0] == len(stored) - 8
    assert pixels_of(stored) == pixels_of(data)
    frame = data.index(b"VP8 ") if b"VP8 " in data else data.index(b"VP8L")
    assert data[frame : frame + 40] in stored


def _webp_mutations() -> dict[str, bytes]:
    data = encode(picture(64, 48), "WEBP")
    longer = bytearray(data)
    struct.pack_into("<I", longer, 4, len(data))  # RIFF size 8 bytes past the end
    chunk_past = bytearray(data)
    struct.pack_into("<I", chunk_past, 16, len(data))  # the frame chunk past the RIFF end
    no_start_code = bytearray(data)
    no_start_code[23] ^= 0xFF
    two_frames = data[12:] * 2
    frame = data[20:]
    first_partition_past = bytearray(data)
    first_partition_past[20:23] = ((0x7FFFF << 5) | 0x10).to_bytes(3, "little")
    return {
        "RIFF size past the end": bytes(longer),
        "chunk past the RIFF end": bytes(chunk_past),
        "no VP8 start code": bytes(no_start_code),
        "two frames": b"RIFF" + struct.pack("<I", len(two_frames) + 4) + b"WEBP" + two_frames,
        "first partition past its chunk": bytes(first_partition_past),
        "frame of another size than the canvas": b"RIFF"
        + struct.pack("<I", 4 + 18 + 8 + len(frame))
        + b"WEBP"
        + b"VP8X"
        + struct.pack("<I", 10)
        + b"\x00\x00\x00\x00"
        + (99).to_bytes(3, "little") * 2
        + data[12:],
        **{f"truncated #{n}": cut for n, cut in enumerate(_truncations(data))},
    }


@pytest.mark.parametrize(("name", "data"), _webp_mutations().items(), ids=list(_webp_mutations()))
def test_corrupt_or_truncated_webp_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        checked(data)


def test_bytes_after_the_riff_end_are_dropped() -> None:
    data = encode(picture(16, 16), "WEBP")
    assert checked(data + b"trailing") == data


def test_an_animated_webp_is_not_a_common_still() -> None:
    frames = [picture(16, 16), picture(16, 16).rotate(90)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    header = read_header(data, LIMITS)
    assert header.animated and not header.is_common_still
