"""The Stable Diffusion server provider against a local server speaking its API."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta
from pathlib import Path

import httpx
import pybase64
import pytest
from imagegen.v1 import common_pb2, generation_pb2
from PIL import Image

from imagegen.domain.errors import InvalidRequest, ProviderFailed
from imagegen.domain.models import Size, Style
from imagegen.providers.base import ProviderRequest, ProviderUnavailable, SourceImage
from imagegen.providers.prompting import STYLE_WORDS
from imagegen.providers.sdwebui import SDWebUIProvider
from tests.fakes.forge_server import png_bytes
from tests.fakes.sdwebui_server import SDFake, SDReply
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import generate

E = generation_pb2


async def quiet(percent: int, stage: str, preview: bytes | None) -> None:
    return None


async def test_txt2img_through_the_server_reports_progress_from_the_endpoint(
    tmp_path: Path, database_url: str
) -> None:
    async with SDFake.start(step_delay=0.15) as fake:
        env = {"IMAGEGEN_SDWEBUI_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            spec = common_pb2.GenerationSpec(
                prompt="a lighthouse",
                negative_prompt="fog",
                seed=1234,
                provider="sdwebui",
                size=common_pb2.ImageSize(width=512, height=512),
            )
            events, err = await generate(server.grpc_port, spec)
    assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    path, body = fake.calls[0]
    assert path == "/sdapi/v1/txt2img"
    assert (body["prompt"], body["negative_prompt"], body["seed"]) == ("a lighthouse", "fog", 1234)
    assert (body["width"], body["height"], body["steps"]) == (512, 512, 20)
    sampling = [
        e
        for e in events
        if e.type == E.GENERATION_EVENT_TYPE_PROGRESS and e.progress.stage == "sampling"
    ]
    assert len(sampling) >= 3
    assert all(e.progress.preview for e in sampling)
    percents = [e.progress.percent for e in sampling]
    assert percents == sorted(percents)


async def test_img2img_sends_the_source_and_mask() -> None:
    source = SourceImage(png_bytes(64, 64), "image/png", 64, 64)
    mask = SourceImage(png_bytes(64, 64, (255, 255, 255)), "image/png", 64, 64)
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, steps=5, poll_interval=0.05)
        reply = await provider.generate(
            ProviderRequest(
                prompt="make it green", sources=(source,), mask=mask, size=Size(512, 512), seed=9
            ),
            quiet,
        )
    path, body = fake.calls[0]
    assert path == "/sdapi/v1/img2img"
    assert pybase64.b64decode(body["init_images"][0]) == source.data
    with Image.open(io.BytesIO(pybase64.b64decode(body["mask"]))) as received:
        # An opaque mask marks nothing to change: all black (keep) for the server.
        assert received.mode == "L" and received.getextrema() == (0, 0)
    assert reply.data.startswith(b"\x89PNG")


async def test_cancel_interrupts_only_while_our_job_runs() -> None:
    async with SDFake.start(step_delay=0.1) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, steps=50, poll_interval=0.05)
        # Ours is running: cancelling interrupts it.
        started = asyncio.Event()

        async def progress(percent: int, stage: str, preview: bytes | None) -> None:
            if stage == "sampling":
                started.set()

        ours = asyncio.create_task(provider.generate(ProviderRequest(prompt="a"), progress))
        await asyncio.wait_for(started.wait(), timeout=10)
        ours.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ours
        assert fake.interrupts == 1

        # Another client's job is running and ours waits behind it: no interrupt.
        foreign = fake.start_foreign_job(steps=30)
        await asyncio.sleep(0.2)
        queued = asyncio.create_task(provider.generate(ProviderRequest(prompt="b"), quiet))
        await asyncio.sleep(0.4)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert fake.interrupts == 1, "the foreign job was not interrupted"
        assert not fake.tasks["task(someone-else)"].interrupted
        foreign.cancel()


async def test_models_are_learned_from_the_server_and_refreshed_when_stale() -> None:
    now = [0.0]
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(
            fake.url, http, steps=2, poll_interval=0.05, models_max_age=60, clock=lambda: now[0]
        )
        assert provider.models == ("sdwebui",), "nothing learned yet"
        assert await provider.refresh_models() == (
            "v1-5-pruned-emaonly",
            "sd_xl_base_1.0",
            "dreamshaper_8",
        )
        provider.check(ProviderRequest(prompt="a", model="sd_xl_base_1.0"))
        with pytest.raises(InvalidRequest) as caught:
            provider.check(ProviderRequest(prompt="a", model="sdwebui"))
        assert "v1-5-pruned-emaonly, sd_xl_base_1.0, dreamshaper_8" in caught.value.message

        fake.checkpoints = ("juggernaut_xl",)
        fake.loaded = "juggernaut_xl"
        await provider.generate(ProviderRequest(prompt="a"), quiet)
        await provider.wait_refreshed()
        assert fake.model_requests == 1, "fresh enough: no refresh after this generation"
        now[0] += 61
        reply = await provider.generate(ProviderRequest(prompt="a"), quiet)
        # Refreshed in the background, once the image was in.
        assert await provider.wait_refreshed() == ("juggernaut_xl",)
        assert fake.model_requests == 2
        assert reply.model == "juggernaut_xl", "the model the server reports it used"


async def test_a_server_that_cannot_list_its_models_keeps_the_last_list() -> None:
    async with SDFake.start() as fake:
        closed_url = fake.url
    async with httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(closed_url, http, models_timeout=2)
        assert await provider.refresh_models() == ("sdwebui",)
        provider.check(ProviderRequest(prompt="a", model="sdwebui"))
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        now = [0.0]
        provider = SDWebUIProvider(
            fake.url, http, steps=1, poll_interval=0.05, models_retry=30, clock=lambda: now[0]
        )
        fake.checkpoints = ()
        assert await provider.refresh_models() == ("sdwebui",)
        await provider.generate(ProviderRequest(prompt="a"), quiet)
        await provider.wait_refreshed()
        assert fake.model_requests == 1, "an empty answer is asked again only after a while"
        now[0] += 30
        fake.checkpoints = ("dreamshaper_8",)
        fake.loaded = "dreamshaper_8"
        await provider.generate(ProviderRequest(prompt="a"), quiet)
        assert await provider.wait_refreshed() == ("dreamshaper_8",)
        assert fake.model_requests == 2
        assert await SDWebUIProvider(None, http).refresh_models() == ("sdwebui",)


def rgba_mask(width: int, height: int) -> bytes:
    """Left half transparent (change it), right half opaque (keep it)."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("style", list(Style), ids=str)
async def test_txt2img_gets_size_seed_negative_prompt_and_the_style_fold(style: Style) -> None:
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, steps=2, poll_interval=0.05)
        reply = await provider.generate(
            ProviderRequest(
                prompt="a lighthouse",
                negative_prompt="fog",
                style=style,
                size=Size(1536, 1024),
                seed=31337,
            ),
            quiet,
        )
    path, body = fake.calls[0]
    assert path == "/sdapi/v1/txt2img"
    assert body["prompt"] == f"a lighthouse, {STYLE_WORDS[style]}"
    assert (body["negative_prompt"], body["seed"]) == ("fog", 31337)
    assert (body["width"], body["height"]) == (1536, 1024)
    assert "override_settings" not in body and "mask" not in body
    assert reply.seed == 31337 and reply.model == "v1-5-pruned-emaonly"


async def test_img2img_turns_the_contracts_mask_into_an_inpainting_mask() -> None:
    source = SourceImage(png_bytes(64, 32), "image/png", 64, 32)
    mask = SourceImage(rgba_mask(64, 32), "image/png", 64, 32)
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, steps=2, poll_interval=0.05)
        await provider.refresh_models()
        await provider.generate(
            ProviderRequest(
                prompt="a hat",
                style=Style.CARTOON,
                sources=(source,),
                mask=mask,
                resize_to=Size(512, 512),
                seed=5,
                model="sd_xl_base_1.0",
            ),
            quiet,
        )
    path, body = fake.calls[0]
    assert path == "/sdapi/v1/img2img"
    assert [pybase64.b64decode(i) for i in body["init_images"]] == [source.data]
    assert (body["width"], body["height"], body["seed"]) == (512, 512, 5)
    # A 64x32 source asked at 512x512: A1111's "Crop and resize" (cover, then crop around
    # the centre, the pipeline's fit rule), never its default stretch (resize_mode 0).
    assert body["resize_mode"] == 1
    assert body["prompt"] == "a hat, cartoon style, bold outlines, flat saturated colors"
    assert body["override_settings"] == {"sd_model_checkpoint": "sd_xl_base_1.0"}
    assert (body["inpainting_fill"], body["inpaint_full_res"], body["inpainting_mask_invert"]) == (
        1,
        False,
        0,
    )
    with Image.open(io.BytesIO(pybase64.b64decode(body["mask"]))) as received:
        assert received.size == (64, 32) and received.mode == "L"
        assert received.getpixel((5, 16)) == 255, "transparent: repaint (white)"
        assert received.getpixel((60, 16)) == 0, "opaque: keep (black)"


async def test_a_reply_of_another_size_is_returned_as_it_came() -> None:
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        fake.script(SDReply(size=(768, 768)))
        provider = SDWebUIProvider(fake.url, http, steps=2, poll_interval=0.05)
        reply = await provider.generate(ProviderRequest(prompt="a", size=Size(256, 256)), quiet)
    with Image.open(io.BytesIO(reply.data)) as image:
        assert image.size == (768, 768)
    assert (fake.body()["width"], fake.body()["height"]) == (256, 256)


async def test_failures_are_classified() -> None:
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(fake.url, http, steps=2, poll_interval=0.05)
        fake.script(
            SDReply(status=422, detail="width: value is not a valid integer"),
            SDReply(status=429, headers={"Retry-After": "4"}),
            SDReply(status=500, detail="CUDA out of memory"),
            SDReply(drop=True),
        )
        outcomes: list[ProviderFailed] = []
        for _ in range(4):
            with pytest.raises(ProviderFailed) as caught:
                await provider.generate(ProviderRequest(prompt="a"), quiet)
            outcomes.append(caught.value)
        fake.script(SDReply(delay=10))
        with pytest.raises(ProviderFailed) as slow:
            await asyncio.wait_for(
                provider.generate(ProviderRequest(prompt="a", timeout=0.5), quiet), timeout=5
            )
    invalid, busy, failing, dropped = outcomes
    assert type(invalid) is ProviderFailed and not invalid.retryable
    assert "not a valid integer" in invalid.message
    assert isinstance(busy, ProviderUnavailable) and busy.throttled
    assert busy.retry_after == timedelta(seconds=4)
    assert isinstance(failing, ProviderUnavailable) and failing.retryable
    assert "CUDA out of memory" in failing.message
    assert isinstance(dropped, ProviderUnavailable) and not dropped.retryable
    assert not slow.value.retryable and "did not answer" in slow.value.message


async def test_a_stale_list_is_refreshed_once_in_the_background() -> None:
    """A call that ends while the lists are stale does not wait for the server's listing;
    calls ending together ask once; closing the provider stops a refresh in flight."""
    now = [0.0]
    async with SDFake.start(step_delay=0.01) as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(
            fake.url,
            http,
            steps=1,
            poll_interval=0.05,
            models_max_age=60,
            models_timeout=3600,
            clock=lambda: now[0],
        )
        learned = await provider.refresh_models()
        now[0] += 61

        # A server that never answers the listing: the call still ends.
        fake.models_delay = 3600
        await asyncio.wait_for(provider.generate(ProviderRequest(prompt="a"), quiet), 30)
        await provider.aclose()
        assert await provider.wait_refreshed() == learned, "the last list is kept"

        # Three calls ending together (the lists still stale): one listing.
        fake.models_delay = 0.2
        before = fake.model_requests
        await asyncio.gather(
            *[provider.generate(ProviderRequest(prompt="a"), quiet) for _ in range(3)]
        )
        await provider.wait_refreshed()
        assert fake.model_requests == before + 1
