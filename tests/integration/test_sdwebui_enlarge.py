"""Outpainting and upscaling on the Stable Diffusion server provider, against a local
server speaking the AUTOMATIC1111 API: what the server RECEIVED (the padded canvas,
the mask, the upscaler and factor), the upscaler list it is asked for, failures."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import httpx
import pybase64
import pytest
from imagegen.v1 import generation_pb2, generation_pb2_grpc
from PIL import Image, ImageChops, ImageStat

from imagegen.domain.enlarge import outpaint_geometry
from imagegen.domain.errors import InvalidRequest, ProviderFailed
from imagegen.domain.models import OutpaintAnchor, OutpaintSpec, Size, Style, UpscaleSpec
from imagegen.providers.base import ProviderRequest, ProviderUnavailable, SourceImage
from imagegen.providers.sdwebui import SDWebUIProvider
from tests.fakes.sdwebui_server import SDFake, SDReply
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, metadata

LEARNED = ("ESRGAN_4x", "LDSR", "R-ESRGAN 4x+", "SwinIR_4x", "Lanczos", "Nearest")
Progress = list[tuple[int, str, bytes | None]]


def gradient(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 7 % 256, y * 11 % 256, (x + y) % 256) for y in range(height) for x in range(width)]
    )
    return image


def source_of(image: Image.Image) -> SourceImage:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return SourceImage(out.getvalue(), "image/png", image.width, image.height)


def b64_image(value: str) -> Image.Image:
    with Image.open(io.BytesIO(pybase64.b64decode(value))) as image:
        image.load()
        return image


class Recorder:
    """A progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.calls: Progress = []

    async def __call__(self, percent: int, stage: str, preview: bytes | None) -> None:
        self.calls.append((percent, stage, preview))


async def quiet(percent: int, stage: str, preview: bytes | None) -> None:
    return None


# --- outpaint -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        OutpaintSpec(left=64, top=0, right=32, bottom=128),
        OutpaintSpec(target=Size(320, 200), anchor=OutpaintAnchor.TOP_LEFT),
        OutpaintSpec(target=Size(160, 400)),
    ],
    ids=["sides", "target-top-left", "target-centre"],
)
async def test_outpaint_is_an_inpaint_of_the_padded_canvas_with_a_mask_of_the_new_area(
    spec: OutpaintSpec,
) -> None:
    source = gradient(96, 80)
    geometry = outpaint_geometry(Size(96, 80), spec, max_pixels=4096 * 4096)
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, steps=3, poll_interval=0.05)
        request = ProviderRequest(
            prompt="a wider beach",
            negative_prompt="people",
            style=Style.WATERCOLOR,
            seed=77,
            size=Size(1024, 1024),  # ignored: the canvas decides
            sources=(source_of(source),),
            outpaint=geometry,
        )
        provider.check(request)
        reply = await provider.generate(request, quiet)
    path, body = fake.calls[0]
    assert path == "/sdapi/v1/img2img"
    canvas = geometry.canvas
    assert (body["width"], body["height"]) == (canvas.width, canvas.height)
    assert (body["seed"], body["negative_prompt"]) == (77, "people")
    assert body["prompt"].startswith("a wider beach, watercolor")
    assert len(body["init_images"]) == 1
    init = b64_image(body["init_images"][0]).convert("RGB")
    assert init.size == (canvas.width, canvas.height)
    # The source, pixel for pixel, at its offset; the new area pre-filled, not black.
    assert ImageChops.difference(init.crop(geometry.box), source).getbbox() is None
    mask = b64_image(body["mask"])
    assert mask.mode == "L" and mask.size == init.size
    assert mask.crop(geometry.box).getextrema() == (0, 0), "the source is kept (black)"
    assert mask.histogram()[255] == canvas.pixels - geometry.source.pixels, "the new area"
    assert max(ImageStat.Stat(init, mask=mask).mean) > 0, "the new area starts filled"
    assert (
        body["inpainting_fill"],
        body["inpaint_full_res"],
        body["inpainting_mask_invert"],
        body["mask_blur"],
        body["resize_mode"],
    ) == (1, False, 0, 4, 0)
    assert 0.8 <= body["denoising_strength"] <= 1.0
    with Image.open(io.BytesIO(reply.data)) as image:
        assert image.size == (canvas.width, canvas.height)


async def test_an_outpaint_reports_sampling_progress_and_is_interrupted_when_cancelled() -> None:
    geometry = outpaint_geometry(Size(32, 32), OutpaintSpec(right=32), max_pixels=4096 * 4096)
    request = ProviderRequest(
        prompt="more", sources=(source_of(gradient(32, 32)),), outpaint=geometry
    )
    async with SDFake.start(step_delay=0.05) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, steps=200, poll_interval=0.05)
        sampling = asyncio.Event()
        seen: Progress = []

        async def progress(percent: int, stage: str, preview: bytes | None) -> None:
            seen.append((percent, stage, preview))
            if stage == "sampling" and preview:
                sampling.set()

        task = asyncio.create_task(provider.generate(request, progress))
        await asyncio.wait_for(sampling.wait(), timeout=20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fake.interrupts == 1
    assert seen[0][:2] == (0, "queued")


# --- upscale ------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
async def test_upscale_goes_to_the_extras_endpoint_with_the_factor_and_upscaler(
    factor: int,
) -> None:
    source = source_of(gradient(48, 40))
    async with SDFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http)
        await provider.refresh_models()
        request = ProviderRequest(
            prompt="unused", sources=(source,), upscale=UpscaleSpec(factor, "R-ESRGAN 4x+")
        )
        provider.check(request)
        progress = Recorder()
        reply = await provider.generate(request, progress)
    path, body = fake.calls[0]
    assert path == "/sdapi/v1/extra-single-image"
    assert pybase64.b64decode(body["image"]) == source.data
    assert (body["resize_mode"], body["upscaling_resize"], body["upscaler_1"]) == (
        0,
        factor,
        "R-ESRGAN 4x+",
    )
    # Nothing else is done to the image: no second upscaler, no face restoration.
    assert (body["upscaler_2"], body["extras_upscaler_2_visibility"]) == ("None", 0)
    assert (body["gfpgan_visibility"], body["codeformer_visibility"]) == (0, 0)
    with Image.open(io.BytesIO(reply.data)) as image:
        assert image.size == (48 * factor, 40 * factor)
    assert reply.model == "R-ESRGAN 4x+"
    assert [(p, s) for p, s, _ in progress.calls] == [(0, "upscaling"), (90, "received")]


async def test_the_default_upscaler_is_the_first_learned_and_lanczos_before_that() -> None:
    source = source_of(gradient(16, 16))
    async with SDFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http)
        assert provider.upscalers == ("Lanczos", "Nearest"), "nothing learned yet"
        first = await provider.generate(
            ProviderRequest(prompt="x", sources=(source,), upscale=UpscaleSpec(2)), quiet
        )
        # That call found the list stale and learned it (in the background).
        await provider.wait_refreshed()
        assert provider.upscalers == LEARNED
        second = await provider.generate(
            ProviderRequest(prompt="x", sources=(source,), upscale=UpscaleSpec(2)), quiet
        )
    assert [body["upscaler_1"] for _, body in fake.calls] == ["Lanczos", "ESRGAN_4x"]
    assert (first.model, second.model) == ("Lanczos", "ESRGAN_4x")


async def test_upscalers_are_learned_without_none_and_refreshed_when_stale() -> None:
    now = [0.0]
    async with SDFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, models_max_age=60, clock=lambda: now[0])
        await provider.refresh_models()
        assert provider.upscalers == LEARNED and "None" not in provider.upscalers
        assert provider.models[0] == "v1-5-pruned-emaonly", "models are learned alongside"
        placeholder = SourceImage(b"", "", 0, 0)
        with pytest.raises(InvalidRequest) as caught:
            provider.check(
                ProviderRequest(
                    prompt="x", sources=(placeholder,), upscale=UpscaleSpec(2, "4x-UltraSharp")
                )
            )
        assert caught.value.field == "upscale.upscaler"
        assert caught.value.metadata["upscalers"] == ",".join(LEARNED)

        fake.upscalers = ("None", "Lanczos", "ESRGAN_4x", "4x-UltraSharp")
        source = source_of(gradient(8, 8))
        upscale = ProviderRequest(prompt="x", sources=(source,), upscale=UpscaleSpec(2))
        await provider.generate(upscale, quiet)
        assert fake.upscaler_requests == 1, "fresh enough: not asked again"
        now[0] += 61
        await provider.generate(upscale, quiet)
        await provider.wait_refreshed()
        assert fake.upscaler_requests == 2
        assert provider.upscalers == ("ESRGAN_4x", "4x-UltraSharp", "Lanczos")


async def test_a_server_that_cannot_list_upscalers_keeps_the_last_list_and_asks_again_soon() -> (
    None
):
    now = [0.0]
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        fake.upscalers_status = 500
        provider = SDWebUIProvider(
            fake.url,
            http,
            steps=1,
            poll_interval=0.05,
            models_max_age=300,
            models_retry=30,
            clock=lambda: now[0],
        )
        await provider.refresh_models()
        assert provider.upscalers == ("Lanczos", "Nearest")
        assert provider.models[0] == "v1-5-pruned-emaonly", "the models are still learned"
        fake.upscalers_status = 200
        now[0] += 30
        await provider.generate(ProviderRequest(prompt="a"), quiet)
        await provider.wait_refreshed()
        assert provider.upscalers == LEARNED
        # An empty list is no list either.
        fake.upscalers = ("None",)
        now[0] += 300
        await provider.generate(ProviderRequest(prompt="a"), quiet)
        await provider.wait_refreshed()
        assert fake.upscaler_requests == 3 and provider.upscalers == LEARNED


async def test_upscale_failures_carry_the_servers_words_and_end_at_the_deadline() -> None:
    source = source_of(gradient(8, 8))
    async with SDFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http)
        await provider.refresh_models()
        # Offered when learned, gone from the server since.
        fake.upscalers = ("None", "Lanczos")
        with pytest.raises(ProviderFailed) as gone:
            await provider.generate(
                ProviderRequest(prompt="x", sources=(source,), upscale=UpscaleSpec(2, "LDSR")),
                quiet,
            )
        assert "could not find upscaler named LDSR" in gone.value.message
        fake.script(SDReply(delay=10))
        with pytest.raises(ProviderUnavailable) as slow:
            await asyncio.wait_for(
                provider.generate(
                    ProviderRequest(
                        prompt="x", sources=(source,), upscale=UpscaleSpec(2), timeout=0.5
                    ),
                    quiet,
                ),
                timeout=5,
            )
        assert not slow.value.retryable and "did not answer" in slow.value.message
    assert [path for path, _ in fake.calls] == ["/sdapi/v1/extra-single-image"] * 2


# --- ListProviders ------------------------------------------------------------------------


async def test_list_providers_shows_who_can_outpaint_and_upscale_with_what(
    tmp_path: Path, database_url: str
) -> None:
    async with SDFake.start() as fake:
        env = {"IMAGEGEN_SDWEBUI_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
                listed = await stub.ListProviders(
                    generation_pb2.ListProvidersRequest(), metadata=metadata()
                )
    providers = {p.id: p for p in listed.providers}
    assert providers["local"].capabilities.outpaint and providers["local"].capabilities.upscale
    assert list(providers["local"].upscalers) == ["lanczos"]
    sdwebui = providers["sdwebui"]
    assert sdwebui.capabilities.outpaint and sdwebui.capabilities.upscale
    assert list(sdwebui.upscalers) == list(LEARNED), "learned when the service started"
