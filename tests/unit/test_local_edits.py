"""The `local` provider's edit instructions each change the pixels as named."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageStat

from imagegen.domain.errors import InvalidRequest
from imagegen.providers.base import ProviderRequest, SourceImage
from imagegen.providers.local import LocalProvider
from imagegen.providers.local_edits import apply_operations, parse_instruction


def source() -> Image.Image:
    """A 60x40 image: red left half, blue right half, a green top-left pixel."""
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    image.paste((30, 30, 200), (30, 0, 60, 40))
    image.putpixel((0, 0), (0, 255, 0))
    return image


def edit(instruction: str) -> Image.Image:
    return apply_operations(source(), parse_instruction(instruction))


def mean(image: Image.Image) -> float:
    return sum(ImageStat.Stat(image).mean) / 3


def test_grayscale_and_sepia() -> None:
    gray = edit("make it grayscale")
    assert all(len(set(gray.getpixel((x, 20)))) == 1 for x in (5, 45))  # type: ignore[arg-type]
    red, green, blue = edit("sepia").getpixel((45, 20))  # type: ignore[misc]
    assert red > green > blue


def test_blur_sharpen_brighten_darken() -> None:
    original = source()
    edge = lambda image: abs(image.getpixel((29, 20))[0] - image.getpixel((30, 20))[0])  # noqa: E731
    assert edge(edit("blur")) < edge(original)
    assert mean(edit("brighten")) > mean(original) > mean(edit("darken"))
    assert ImageStat.Stat(edit("sharpen")).stddev[0] >= ImageStat.Stat(original).stddev[0]


def test_geometry() -> None:
    rotated = edit("rotate")
    assert rotated.size == (40, 60)
    assert rotated.getpixel((39, 0)) == (0, 255, 0), "90 degrees clockwise"
    assert edit("rotate left").getpixel((0, 59)) == (0, 255, 0)
    assert edit("flip").getpixel((0, 39)) == (0, 255, 0)
    assert edit("mirror").getpixel((59, 0)) == (0, 255, 0)
    assert edit("crop to square").size == (40, 40)
    bordered = edit("add a border")
    assert bordered.size[0] > 60 and bordered.getpixel((0, 0)) == (255, 255, 255)
    assert edit("upscale").size == (120, 80)


def test_invert_and_chains() -> None:
    assert edit("invert").getpixel((0, 0)) == (255, 0, 255)
    chained = edit("mirror, then invert and crop to square")
    assert chained.size == (40, 40)


@pytest.mark.parametrize(
    "instruction", ["make it look like van gogh", "grayscale and add a cat", ""]
)
def test_unknown_instructions_are_refused_with_a_sentence(instruction: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_instruction(instruction)
    assert caught.value.field == "prompt"


async def test_provider_edit_answers_at_the_size_its_operations_leave() -> None:
    buffer = io.BytesIO()
    source().save(buffer, format="PNG")
    src = SourceImage(buffer.getvalue(), "image/png", 60, 40)
    calls: list[int] = []

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        calls.append(percent)

    provider = LocalProvider(step_delay=0)
    kept = await provider.generate(ProviderRequest(prompt="sepia", sources=(src,)), progress)
    assert Image.open(io.BytesIO(kept.data)).size == (60, 40)
    assert calls == sorted(calls) and calls[-1] == 100
    from imagegen.domain.models import Size

    # An asked size is the pipeline's to reach by its one fit rule (cover, then crop
    # around the centre); stretching the 3:2 source to a square here would distort it.
    asked = await provider.generate(
        ProviderRequest(prompt="sepia", sources=(src,), resize_to=Size(256, 256)), progress
    )
    assert asked.data == kept.data
