"""The `local` renderer: deterministic, thirteen distinct styles, exact sizes, real progress."""

from __future__ import annotations

import asyncio
import io
import itertools

import pytest
from PIL import Image, ImageChops, ImageStat

from imagegen.domain.models import STANDARD_SIZES, Size, Style
from imagegen.providers.base import ProviderRequest
from imagegen.providers.local import LocalProvider


async def render(request: ProviderRequest) -> tuple[bytes, list[tuple[int, str, bytes | None]]]:
    calls: list[tuple[int, str, bytes | None]] = []

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        calls.append((percent, stage, preview))

    reply = await LocalProvider(step_delay=0).generate(request, progress)
    return reply.data, calls


def small(**kwargs: object) -> ProviderRequest:
    values: dict[str, object] = {"prompt": "a red fox in snow", "seed": 7, "size": Size(256, 256)}
    values.update(kwargs)
    return ProviderRequest(**values)  # type: ignore[arg-type]


async def test_same_inputs_give_the_same_bytes() -> None:
    first, _ = await render(small(style=Style.ANIME))
    second, _ = await render(small(style=Style.ANIME))
    assert first == second
    other_seed, _ = await render(small(style=Style.ANIME, seed=8))
    other_prompt, _ = await render(small(style=Style.ANIME, prompt="a blue whale"))
    other_negative, _ = await render(small(style=Style.ANIME, negative_prompt="people"))
    assert len({first, other_seed, other_prompt, other_negative}) == 4


@pytest.mark.parametrize("prompt", ["a red fox in snow", "a city at night"])
async def test_every_style_and_no_style_look_different(prompt: str) -> None:
    images: dict[Style | None, Image.Image] = {}
    for style in (None, *Style):
        data, _ = await render(small(style=style, prompt=prompt))
        images[style] = Image.open(io.BytesIO(data)).convert("RGB")
    assert len(images) == 14, "all 13 presets and no preset"
    for (a, image_a), (b, image_b) in itertools.combinations(images.items(), 2):
        difference = ImageStat.Stat(ImageChops.difference(image_a, image_b)).mean
        assert sum(difference) / 3 > 12, f"{a} and {b} look alike ({difference})"


@pytest.mark.parametrize("size", STANDARD_SIZES, ids=str)
async def test_every_listed_size_comes_out_at_that_size(size: Size) -> None:
    data, _ = await render(small(size=size, style=Style.PIXEL_ART))
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size == (size.width, size.height)


async def test_progress_rises_with_previews_that_decode_and_differ() -> None:
    _, calls = await render(small(style=Style.CINEMATIC))
    percents = [p for p, _, _ in calls]
    assert percents == sorted(percents) and percents[-1] == 100
    previews = [preview for _, _, preview in calls if preview]
    assert len(previews) >= 3
    for preview in previews:
        with Image.open(io.BytesIO(preview)) as image:
            image.load()
            assert max(image.size) <= 128
    assert len(set(previews)) == len(previews)


async def test_cancellation_stops_rendering_between_stages() -> None:
    stages: list[str] = []

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        stages.append(stage)

    task = asyncio.create_task(LocalProvider(step_delay=5).generate(small(), progress))
    while len(stages) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "rendered" not in stages


async def test_it_reports_its_model_and_the_seed_it_used() -> None:
    reply = await LocalProvider(step_delay=0).generate(
        small(size=Size(1536, 1024), seed=99, model="local-pillow-1"), no_progress
    )
    assert (reply.model, reply.seed) == ("local-pillow-1", 99)
    with Image.open(io.BytesIO(reply.data)) as image:
        assert image.size == (1536, 1024)


async def no_progress(percent: int, stage: str, preview: bytes | None) -> None:
    return None
