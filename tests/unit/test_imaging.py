"""Image checks: type by bytes, byte and pixel limits at their edges, bombs, conversion."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagegen.domain.errors import ImageTooLarge
from imagegen.domain.models import ImageFormat
from imagegen.imaging import ImageDecodeError, convert_image, inspect_image, sniff_format
from tests.fakes.forge_server import bomb_png, png_bytes


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 200, 30) if mode == "RGB" else (10, 200, 30, 128)).save(
        out, format=fmt
    )
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_format_is_recognised_by_its_bytes(fmt: str) -> None:
    info = inspect_image(encoded(fmt), max_pixels=10_000)
    assert info.format.value == fmt.lower()
    assert (info.width, info.height) == (40, 30)


def test_other_formats_and_garbage_are_refused() -> None:
    for data in (encoded("GIF"), encoded("BMP"), b"not an image", b""):
        with pytest.raises(ImageDecodeError):
            inspect_image(data, max_pixels=10_000)


def test_truncated_png_is_refused() -> None:
    data = png_bytes(200, 200)
    with pytest.raises(ImageDecodeError):
        inspect_image(data[: len(data) // 2], max_pixels=1_000_000)


def test_pixel_limit_at_and_past_the_edge() -> None:
    data = encoded("PNG", (100, 100))
    assert inspect_image(data, max_pixels=10_000).width == 100
    with pytest.raises(ImageTooLarge):
        inspect_image(data, max_pixels=9_999)


def test_byte_limit_at_and_past_the_edge() -> None:
    data = encoded("PNG")
    assert inspect_image(data, max_pixels=10_000, max_bytes=len(data)).height == 30
    with pytest.raises(ImageTooLarge):
        inspect_image(data, max_pixels=10_000, max_bytes=len(data) - 1)


def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = bomb_png(20000)
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge):
        inspect_image(bomb, max_pixels=16_777_216)
    with pytest.raises(ImageTooLarge):
        convert_image(bomb, ImageFormat.PNG, max_pixels=16_777_216)


@pytest.mark.parametrize("target", list(ImageFormat))
def test_conversion_to_each_format(target: ImageFormat) -> None:
    source = encoded("PNG", mode="RGBA")
    out = convert_image(source, target, max_pixels=10_000)
    assert sniff_format(out) is target
    info = inspect_image(out, max_pixels=10_000)
    assert (info.width, info.height) == (40, 30)
