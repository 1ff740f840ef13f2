"""The Stable Diffusion server provider against a local server speaking its API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pybase64
import pytest
from imagegen.v1 import common_pb2, generation_pb2

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Size
from imagegen.providers.base import ProviderRequest, SourceImage
from imagegen.providers.sdwebui import SDWebUIProvider
from tests.fakes.forge_server import png_bytes
from tests.fakes.sdwebui_server import SDFake
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
    assert pybase64.b64decode(body["mask"]) == mask.data
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
        assert fake.model_requests == 1, "fresh enough: no refresh after this generation"
        now[0] += 61
        reply = await provider.generate(ProviderRequest(prompt="a"), quiet)
        assert fake.model_requests == 2 and provider.models == ("juggernaut_xl",)
        assert reply.model == "juggernaut_xl", "the model the server reports it used"


async def test_a_server_that_cannot_list_its_models_keeps_the_last_list() -> None:
    async with SDFake.start() as fake:
        closed_url = fake.url
    async with httpx.AsyncClient(trust_env=False) as http:
        provider = SDWebUIProvider(closed_url, http, models_timeout=2)
        assert await provider.refresh_models() == ("sdwebui",)
        provider.check(ProviderRequest(prompt="a", model="sdwebui"))
        assert await SDWebUIProvider(None, http).refresh_models() == ("sdwebui",)
