"""The one entry point for a provider's reply: pass-through when nothing changes, else
exactly one decode, one fit (when the size differs) and one encode, with exact output
dimensions by the cover-crop rule; bombs refused before any decode."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from imagegen.domain.errors import ImageTooLarge
from imagegen.domain.models import ImageFormat, Size
from imagegen.imaging import (
    CoverCrop,
    DecodedImage,
    EncodeSettings,
    ImageDecodeError,
    ImageHeader,
    ImageLimits,
    Preparation,
    PreparedImage,
    VipsCodec,
    cover_crop,
    prepare_output,
    sniff_format,
)
from tests.fakes.forge_server import bomb_png
from tests.unit.test_imaging_check import encode, idat_of, jpeg_bomb, picture, webp_bomb

LIMITS = ImageLimits(max_pixels=16_777_216)


class CountingCodec:
    """The production codec, counting what the pipeline asks of it."""

    def __init__(self) -> None:
        self.inner = VipsCodec()
        self.calls: Counter[str] = Counter()

    def decode(self, data: bytes, header: ImageHeader) -> DecodedImage:
        self.calls["decode"] += 1
        return self.inner.decode(data, header)

    def fit(self, image: DecodedImage, width: int, height: int) -> DecodedImage:
        self.calls["fit"] += 1
        return self.inner.fit(image, width, height)

    def encode(self, image: DecodedImage, target: ImageFormat, settings: EncodeSettings) -> bytes:
        self.calls["encode"] += 1
        return self.inner.encode(image, target, settings)

    def preview(self, image: DecodedImage, max_side: int) -> bytes:
        self.calls["preview"] += 1
        return self.inner.preview(image, max_side)


class RefusingCodec(CountingCodec):
    """Fails the test on any pixel work."""

    def decode(self, data: bytes, header: ImageHeader) -> DecodedImage:
        raise AssertionError("decoded")


def prepare(
    data: bytes,
    target: ImageFormat,
    size: Size | None,
    codec: CountingCodec,
    **options: object,
) -> PreparedImage:
    return prepare_output(
        data,
        target_format=target,
        target_size=size,
        limits=LIMITS,
        encode_settings=EncodeSettings(),
        codec=codec,
        **options,
    )


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- pass-through -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_same_format_and_size_is_stored_without_decode(fmt: ImageFormat) -> None:
    data = encode(picture(96, 64), fmt.value.upper())
    codec = CountingCodec()
    prepared = prepare(data, fmt, Size(96, 64), codec)
    assert prepared.preparation is Preparation.PASSED_THROUGH
    assert prepared.data == data
    assert codec.calls == Counter()
    assert prepared.info.format is fmt
    assert (prepared.info.width, prepared.info.height) == (96, 64)
    assert prepared.info.mime_type == fmt.mime_type


def test_pass_through_keeps_the_png_pixel_data() -> None:
    data = encode(picture(256, 256), "PNG")
    prepared = prepare(data, ImageFormat.PNG, Size(256, 256), CountingCodec())
    assert prepared.data == data
    assert idat_of(prepared.data) == idat_of(data)


def test_no_target_size_keeps_the_reply_size() -> None:
    data = encode(picture(70, 30), "PNG")
    codec = CountingCodec()
    prepared = prepare(data, ImageFormat.PNG, None, codec)
    assert prepared.preparation is Preparation.PASSED_THROUGH
    assert codec.calls == Counter()


def test_a_corrupt_reply_of_the_asked_format_is_refused_not_converted() -> None:
    data = encode(picture(64, 64), "PNG")
    codec = CountingCodec()
    with pytest.raises(ImageDecodeError):
        prepare(data[: len(data) - 30], ImageFormat.PNG, Size(64, 64), codec)
    assert codec.calls == Counter()


def test_a_pass_through_preview_takes_one_decode() -> None:
    data = encode(picture(300, 200), "PNG")
    codec = CountingCodec()
    prepared = prepare(data, ImageFormat.PNG, Size(300, 200), codec, preview_side=128)
    assert codec.calls == Counter(decode=1, preview=1)
    assert prepared.preview is not None
    assert max(opened(prepared.preview).size) == 128


# --- conversion and fit ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_fmt", "target"),
    [(s, t) for s in ("PNG", "JPEG", "WEBP") for t in ImageFormat if s.lower() != t.value],
)
def test_another_format_is_decoded_and_encoded_once(source_fmt: str, target: ImageFormat) -> None:
    data = encode(picture(80, 60), source_fmt)
    codec = CountingCodec()
    prepared = prepare(data, target, Size(80, 60), codec, preview_side=32)
    assert prepared.preparation is Preparation.CONVERTED
    assert codec.calls == Counter(decode=1, encode=1, preview=1)
    assert sniff_format(prepared.data) is target
    assert opened(prepared.data).size == (80, 60)
    assert prepared.preview is not None and max(opened(prepared.preview).size) == 32


REPLY_SHAPES = [(1024, 1024), (1536, 1024), (1024, 1536), (512, 512), (300, 1000), (97, 61)]
TARGETS = [Size(256, 256), Size(1024, 1536), Size(1536, 1024)]


@pytest.mark.parametrize(
    ("reply", "target"),
    [(r, t) for r in REPLY_SHAPES for t in TARGETS if r != (t.width, t.height)],
    ids=lambda v: str(v) if isinstance(v, Size) else f"{v[0]}x{v[1]}",
)
def test_another_size_is_fitted_exactly_once(reply: tuple[int, int], target: Size) -> None:
    data = encode(picture(*reply), "PNG", compress_level=1)
    codec = CountingCodec()
    prepared = prepare(data, ImageFormat.PNG, target, codec)
    assert prepared.preparation is Preparation.FITTED
    assert codec.calls == Counter(decode=1, fit=1, encode=1)
    assert opened(prepared.data).size == (target.width, target.height)
    assert (prepared.info.width, prepared.info.height) == (target.width, target.height)


def test_size_and_format_change_in_one_pass_with_a_preview() -> None:
    data = encode(picture(1536, 1024), "PNG", compress_level=1)
    codec = CountingCodec()
    prepared = prepare(data, ImageFormat.WEBP, Size(1024, 1024), codec, preview_side=128)
    assert codec.calls == Counter(decode=1, fit=1, encode=1, preview=1)
    assert opened(prepared.data).size == (1024, 1024)
    assert prepared.preview is not None and opened(prepared.preview).size == (128, 128)


def test_the_fit_covers_then_crops_around_the_centre() -> None:
    # A wide image: red left third, green middle third, blue right third. Fitted to a
    # square it must keep the middle (green) and lose most of the sides.
    wide = Image.new("RGB", (300, 100), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 100, 100))
    wide.paste((0, 0, 255), (200, 0, 300, 100))
    prepared = prepare(encode(wide, "PNG"), ImageFormat.PNG, Size(50, 50), CountingCodec())
    square = opened(prepared.data).convert("RGB")
    assert square.size == (50, 50)
    for x in (3, 25, 46):
        red, green, blue = square.getpixel((x, 25))
        assert green > 200 and red < 40 and blue < 40, (x, red, green, blue)


def test_a_tall_image_is_cropped_top_and_bottom() -> None:
    tall = Image.new("RGB", (100, 400), (0, 255, 0))
    tall.paste((255, 0, 0), (0, 0, 100, 100))
    tall.paste((0, 0, 255), (0, 300, 100, 400))
    prepared = prepare(encode(tall, "PNG"), ImageFormat.PNG, Size(200, 500), CountingCodec())
    out = opened(prepared.data).convert("RGB")
    assert out.size == (200, 500)
    # scaled to 200x800 (to cover 200 wide), rows 150..650 kept: red 0..50, green, blue 450..
    assert out.getpixel((100, 20)) == (255, 0, 0)
    assert out.getpixel((100, 250)) == (0, 255, 0)
    assert out.getpixel((100, 480)) == (0, 0, 255)


def test_upscaling_also_gives_the_exact_size() -> None:
    data = encode(picture(10, 7), "PNG")
    prepared = prepare(data, ImageFormat.JPEG, Size(1536, 1024), CountingCodec())
    assert opened(prepared.data).size == (1536, 1024)


def test_transparency_is_laid_on_white_in_jpeg() -> None:
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (0, 0, 20, 40))
    prepared = prepare(encode(image, "PNG"), ImageFormat.JPEG, Size(40, 40), CountingCodec())
    out = opened(prepared.data).convert("RGB")
    assert all(channel > 245 for channel in out.getpixel((35, 20)))
    red, green, blue = out.getpixel((5, 20))
    assert red > 180 and green < 30 and blue < 30


def test_transparency_survives_png_and_webp() -> None:
    image = picture(64, 64, "RGBA")
    for target in (ImageFormat.PNG, ImageFormat.WEBP):
        prepared = prepare(encode(image, "PNG"), target, Size(32, 32), CountingCodec())
        assert opened(prepared.data).mode == "RGBA"


def test_encode_settings_are_used() -> None:
    data = encode(picture(128, 128), "PNG")
    small = prepare_output(
        data,
        target_format=ImageFormat.JPEG,
        target_size=None,
        limits=LIMITS,
        encode_settings=EncodeSettings(jpeg_quality=10),
    )
    large = prepare_output(
        data,
        target_format=ImageFormat.JPEG,
        target_size=None,
        limits=LIMITS,
        encode_settings=EncodeSettings(jpeg_quality=95),
    )
    assert len(small.data) < len(large.data) / 2


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16", "CMYK"])
def test_unusual_pixel_formats_convert(mode: str) -> None:
    image = picture(48, 32).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = image.convert("I;16")
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    prepared = prepare(encode(image, fmt), ImageFormat.WEBP, Size(24, 24), CountingCodec())
    assert opened(prepared.data).size == (24, 24)


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bomb", [bomb_png(60000), jpeg_bomb(65000), webp_bomb()], ids=["png", "jpeg", "webp"]
)
@pytest.mark.parametrize("target", [ImageFormat.PNG, ImageFormat.JPEG])
def test_bombs_are_refused_before_any_decode(bomb: bytes, target: ImageFormat) -> None:
    with pytest.raises(ImageTooLarge):
        prepare(bomb, target, Size(1024, 1024), RefusingCodec(), preview_side=128)


def test_the_byte_limit_comes_first() -> None:
    data = encode(picture(32, 32), "PNG")
    with pytest.raises(ImageTooLarge):
        prepare_output(
            data,
            target_format=ImageFormat.PNG,
            target_size=None,
            limits=ImageLimits(max_pixels=10**9, max_bytes=len(data) - 1),
            encode_settings=EncodeSettings(),
            codec=RefusingCodec(),
        )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_truncated_reply_that_needs_conversion_is_refused(fmt: str) -> None:
    data = encode(picture(64, 64), fmt)
    codec = CountingCodec()
    with pytest.raises(ImageDecodeError):
        prepare(data[: len(data) * 2 // 3], ImageFormat.PNG, Size(32, 32), codec)


def test_a_corrupt_png_that_needs_conversion_is_refused() -> None:
    data = bytearray(encode(picture(64, 64), "PNG", compress_level=1))
    data[len(data) // 2] ^= 0x55  # a CRC mismatch libvips must notice too
    with pytest.raises(ImageDecodeError):
        prepare(bytes(data), ImageFormat.JPEG, Size(32, 32), CountingCodec())


# --- the rule as arithmetic -----------------------------------------------------------


def test_cover_crop_examples() -> None:
    assert cover_crop(1536, 1024, 1024, 1024) == CoverCrop(1536, 1024, 256, 0, 1024, 1024)
    assert cover_crop(1024, 1024, 1024, 1536) == CoverCrop(1536, 1536, 256, 0, 1024, 1536)
    assert cover_crop(1024, 1024, 256, 256) == CoverCrop(256, 256, 0, 0, 256, 256)
    assert cover_crop(100, 400, 200, 300) == CoverCrop(200, 800, 0, 250, 200, 300)


def test_cover_crop_always_covers_and_fits_inside() -> None:
    sides = [1, 2, 3, 7, 61, 97, 255, 256, 511, 1000, 1023, 1024, 1536, 4096]
    for source_width in sides:
        for source_height in sides:
            for target in [*TARGETS, Size(1, 1), Size(4096, 7)]:
                box = cover_crop(source_width, source_height, target.width, target.height)
                assert box.scaled_width >= target.width
                assert box.scaled_height >= target.height
                assert box.left + box.width <= box.scaled_width
                assert box.top + box.height <= box.scaled_height
                # one side is filled exactly (or within the rounding of one pixel)
                assert (
                    box.scaled_width - target.width <= 1 or box.scaled_height - target.height <= 1
                )


def test_cover_crop_refuses_empty_sides() -> None:
    with pytest.raises(ValueError):
        cover_crop(0, 10, 10, 10)
