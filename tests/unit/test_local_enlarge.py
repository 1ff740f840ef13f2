"""`local` outpainting and upscaling: exact output sizes, the source kept pixel for pixel,
a new area that is really filled, determinism, progress with previews, and the canvas
and mask helpers the other providers send."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image, ImageChops, ImageStat

from imagegen.domain.enlarge import OutpaintGeometry, outpaint_geometry
from imagegen.domain.errors import InvalidRequest, ProviderFailed
from imagegen.domain.models import OutpaintAnchor, OutpaintSpec, Size, UpscaleSpec
from imagegen.providers import outpainting
from imagegen.providers.base import PENDING_OUTPAINT, ProviderRequest, SourceImage
from imagegen.providers.local import UPSCALER, LocalProvider

Progress = list[tuple[int, str, bytes | None]]


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """A source whose every edge pixel differs from its neighbours."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            (x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return image


def source_of(image: Image.Image) -> SourceImage:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return SourceImage(out.getvalue(), "image/png", image.width, image.height)


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


async def run(
    request: ProviderRequest, provider: LocalProvider | None = None
) -> tuple[Image.Image, Progress, str]:
    calls: Progress = []

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        calls.append((percent, stage, preview))

    reply = await (provider or LocalProvider(step_delay=0)).generate(request, progress)
    assert reply.mime_type == "image/png"
    return decoded(reply.data), calls, reply.model


def outpaint_request(image: Image.Image, spec: OutpaintSpec) -> ProviderRequest:
    geometry = outpaint_geometry(Size(image.width, image.height), spec, max_pixels=4096 * 4096)
    return ProviderRequest(
        prompt="more of the same meadow", sources=(source_of(image),), outpaint=geometry
    )


# --- outpaint -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        OutpaintSpec(left=40, top=10, right=24, bottom=70),
        OutpaintSpec(right=100),
        OutpaintSpec(top=1),
        OutpaintSpec(target=Size(200, 100), anchor=OutpaintAnchor.BOTTOM_RIGHT),
        OutpaintSpec(target=Size(65, 200)),
    ],
    ids=["all-sides", "right", "one-pixel-top", "target-bottom-right", "target-centre"],
)
async def test_outpaint_keeps_the_source_and_fills_the_rest(spec: OutpaintSpec) -> None:
    source = gradient()
    request = outpaint_request(source, spec)
    geometry = request.outpaint
    assert geometry is not None
    result, _, model = await run(request)
    assert result.size == (geometry.canvas.width, geometry.canvas.height)
    assert model == "local-pillow-1"
    # Every pixel of the source is where the geometry puts it, unchanged.
    inside = result.crop(geometry.box)
    assert ImageChops.difference(inside, source).getbbox() is None
    # The new area holds the source's colours, not black: blank it out of both and
    # compare what remains.
    mask = outpainting.repaint_mask(geometry)
    new_area = Image.composite(result, Image.new("RGB", result.size), mask)
    assert ImageStat.Stat(new_area, mask=mask).mean != [0.0, 0.0, 0.0]
    extrema = [band for band in ImageStat.Stat(result, mask=mask).extrema]
    assert any(low < high for low, high in extrema), "the new area is not one flat colour"


async def test_the_new_area_continues_the_nearest_edge() -> None:
    source = Image.new("RGB", (32, 32), (10, 200, 30))
    source.paste((250, 20, 20), (0, 0, 1, 32))  # a red left edge
    source.paste((20, 20, 250), (31, 0, 32, 32))  # a blue right edge
    result, _, _ = await run(outpaint_request(source, OutpaintSpec(left=64, right=64)))
    far_left = result.getpixel((0, 16))
    far_right = result.getpixel((result.width - 1, 16))
    assert isinstance(far_left, tuple) and isinstance(far_right, tuple)
    assert far_left[0] > 200 and far_left[2] < 60, far_left
    assert far_right[2] > 200 and far_right[0] < 60, far_right


async def test_outpaint_is_deterministic_and_reports_progress_with_previews() -> None:
    request = outpaint_request(gradient(), OutpaintSpec(left=30, bottom=30))
    first, calls, _ = await run(request)
    second, _, _ = await run(request)
    assert first.tobytes() == second.tobytes()
    percents = [percent for percent, _, _ in calls]
    assert percents == sorted(percents) and percents[0] == 0 and percents[-1] == 100
    stages = [stage for _, stage, _ in calls]
    assert stages == ["outpainting", "extending", "blending", "outpainted"]
    previews = [preview for _, _, preview in calls if preview]
    assert len(previews) == 2
    for preview in previews:
        assert max(decoded(preview).size) <= 128


async def test_a_source_of_another_size_than_planned_fails_plainly() -> None:
    request = ProviderRequest(
        prompt="x",
        sources=(source_of(gradient(10, 10)),),
        outpaint=OutpaintGeometry(Size(12, 10), Size(20, 10), 4, 0),
    )
    with pytest.raises(ProviderFailed) as caught:
        await run(request)
    assert not caught.value.retryable


async def test_outpaint_and_upscale_need_a_source() -> None:
    for request in (
        ProviderRequest(prompt="x", outpaint=OutpaintGeometry(Size(1, 1), Size(2, 1), 1, 0)),
        ProviderRequest(prompt="x", upscale=UpscaleSpec(2)),
    ):
        with pytest.raises(InvalidRequest) as caught:
            await run(request)
        assert caught.value.field == "sources"


async def test_cancelling_an_outpaint_stops_it_between_stages() -> None:
    extended = asyncio.Event()
    stages: list[str] = []

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        stages.append(stage)
        if stage == "extending":
            extended.set()

    request = outpaint_request(gradient(), OutpaintSpec(left=8))
    task = asyncio.create_task(LocalProvider(step_delay=30).generate(request, progress))
    await asyncio.wait_for(extended.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "outpainted" not in stages


# --- upscale ------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
async def test_upscale_makes_exactly_the_factors_size_and_looks_like_the_source(
    factor: int,
) -> None:
    source = gradient(40, 30)
    request = ProviderRequest(
        prompt="ignored", sources=(source_of(source),), upscale=UpscaleSpec(factor)
    )
    result, calls, model = await run(request)
    assert result.size == (40 * factor, 30 * factor)
    assert model == UPSCALER == "lanczos"
    back = result.resize(source.size, Image.Resampling.BOX)
    # Brought back down it is the source again, within a small error per channel.
    assert max(ImageStat.Stat(ImageChops.difference(back, source)).mean) < 6
    assert [stage for _, stage, _ in calls] == ["upscaling", "resampling", "sharpening", "upscaled"]
    assert len([preview for _, _, preview in calls if preview]) == 2


async def test_upscale_sharpens_after_the_resample() -> None:
    source = gradient(40, 30)
    request = ProviderRequest(prompt="x", sources=(source_of(source),), upscale=UpscaleSpec(2))
    result, _, _ = await run(request)
    plain = source.resize((80, 60), Image.Resampling.LANCZOS)
    assert ImageChops.difference(result, plain).getbbox() is not None
    first, _, _ = await run(request)
    assert first.tobytes() == result.tobytes()


def test_local_says_what_it_can_do_and_checks_its_upscaler() -> None:
    local = LocalProvider(step_delay=0)
    assert local.capabilities.outpaint and local.capabilities.upscale
    assert local.upscalers == ("lanczos",)
    placeholder = SourceImage(b"", "", 0, 0)
    # An outpaint's or upscale's prompt is free text, not an edit instruction.
    local.check(
        ProviderRequest(prompt="a wider meadow", sources=(placeholder,), outpaint=PENDING_OUTPAINT)
    )
    local.check(ProviderRequest(prompt="x", sources=(placeholder,), upscale=UpscaleSpec(4)))
    local.check(
        ProviderRequest(prompt="x", sources=(placeholder,), upscale=UpscaleSpec(2, "lanczos"))
    )
    with pytest.raises(InvalidRequest) as caught:
        local.check(
            ProviderRequest(prompt="x", sources=(placeholder,), upscale=UpscaleSpec(2, "esrgan"))
        )
    assert caught.value.field == "upscale.upscaler"
    # A plain edit is still read as instructions.
    with pytest.raises(InvalidRequest):
        local.check(ProviderRequest(prompt="a wider meadow", sources=(placeholder,)))


# --- the canvases other providers send ----------------------------------------------------


def test_masks_mark_the_new_area_in_each_convention() -> None:
    geometry = OutpaintGeometry(Size(4, 3), Size(10, 5), left=2, top=1)
    repaint = outpainting.repaint_mask(geometry)
    assert repaint.mode == "L" and repaint.size == (10, 5)
    assert repaint.crop(geometry.box).getextrema() == (0, 0)
    assert repaint.getpixel((0, 0)) == 255 and repaint.getpixel((9, 4)) == 255
    assert repaint.getpixel((6, 2)) == 255 and repaint.getpixel((5, 2)) == 0
    keep = outpainting.keep_mask(geometry)
    alpha = keep.getchannel("A")
    assert alpha.crop(geometry.box).getextrema() == (255, 255)
    assert ImageChops.invert(alpha).tobytes() == repaint.tobytes()
    canvas = outpainting.transparent_canvas(gradient(4, 3), geometry)
    assert canvas.getchannel("A").tobytes() == alpha.tobytes()
    assert canvas.crop(geometry.box).convert("RGB").tobytes() == gradient(4, 3).tobytes()


def test_widening_to_a_shape_centres_the_canvas_and_scaling_keeps_the_source_inside() -> None:
    square = Size(1024, 1024)
    geometry = OutpaintGeometry(Size(100, 50), Size(300, 200), left=150, top=100)
    assert outpainting.widened(geometry, square) == OutpaintGeometry(
        Size(100, 50), Size(300, 300), left=150, top=150
    )
    tall = OutpaintGeometry(Size(10, 10), Size(20, 90), left=5, top=80)
    widened = outpainting.widened(tall, Size(1024, 1536))
    assert widened.canvas == Size(60, 90) and (widened.left, widened.top) == (25, 80)
    # A canvas of the shape already is left as it is.
    exact = OutpaintGeometry(Size(10, 10), Size(30, 20), left=0, top=10)
    assert outpainting.widened(exact, Size(1536, 1024)) == exact
    # Scaled by 4/9: the source rounds to one pixel, kept inside the canvas.
    scaled = outpainting.scaled_to(
        OutpaintGeometry(Size(3, 3), Size(9, 6), left=6, top=3), Size(4, 3)
    )
    assert scaled == OutpaintGeometry(Size(1, 1), Size(4, 3), left=3, top=1)
    edge = outpainting.scaled_to(OutpaintGeometry(Size(5, 5), Size(9, 9), 4, 4), Size(2, 2))
    assert edge.box[2] <= 2 and edge.box[3] <= 2
