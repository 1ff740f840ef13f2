"""Outpaint and upscale jobs through a served process: what the sdwebui and openai
fakes RECEIVED for an outpaint (the padded canvas and its mask), an upscale on the
sdwebui fake and on `local` (the factor's size, its parent, charged once), and an
upscale cancelled or killed with -9 mid-job, as generations are."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import httpx
import pybase64
import pytest
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    library_pb2,
    library_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from PIL import Image, ImageChops

from imagegen.domain.enlarge import outpaint_geometry
from imagegen.domain.models import OutpaintSpec, Size
from tests.e2e.test_jobs import log_is_gap_free, query, watch
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.sdwebui_server import SDFake
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e
E = generation_pb2
C = common_pb2
TERMINAL = (
    E.GENERATION_EVENT_TYPE_COMPLETED,
    E.GENERATION_EVENT_TYPE_FAILED,
    E.GENERATION_EVENT_TYPE_CANCELLED,
)


def gradient(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            (40 + x * 7 % 200, 40 + y * 11 % 200, 40 + (x + y) % 200)
            for y in range(height)
            for x in range(width)
        ]
    )
    return image


def png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def opened(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image


async def download(uri: str) -> Image.Image:
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(uri)
    reply.raise_for_status()
    return opened(reply.content)


async def rpc(server: ServedProcess, method: str, request: Any, user: str = "alice") -> Any:
    async with server.channel() as channel:
        stubs: dict[str, Any] = {
            "generation": server.stub(channel),
            "library": library_pb2_grpc.ImageLibraryServiceStub(channel),
            "usage": usage_pb2_grpc.UsageServiceStub(channel),
        }
        service, name = method.split(".")
        return await getattr(stubs[service], name)(
            request, metadata=server.metadata(user), timeout=60
        )


async def finished(server: ServedProcess, name: str) -> E.Generation:
    await watch(server, name)
    reply = await rpc(server, "generation.GetGeneration", E.GetGenerationRequest(name=name))
    return reply.generation  # type: ignore[no-any-return]


async def generated(server: ServedProcess, width: int = 256, height: int = 256) -> C.Image:
    """A library image made by `local`."""
    spec = C.GenerationSpec(
        prompt="a fox", provider="local", size=C.ImageSize(width=width, height=height)
    )
    reply = await rpc(server, "generation.SubmitGeneration", E.SubmitGenerationRequest(spec=spec))
    done = await finished(server, reply.generation.name)
    (image,) = done.images
    return image  # type: ignore[no-any-return]


async def balance(server: ServedProcess) -> int:
    reply = await rpc(server, "usage.GetCreditBalance", usage_pb2.GetCreditBalanceRequest())
    return int(reply.balance.available_credits)


# --- outpaint ----------------------------------------------------------------------------


async def test_an_sdwebui_outpaint_job_sends_the_padded_canvas_and_the_mask_of_the_new_area(
    tmp_path: Path, database_url: str
) -> None:
    source = gradient(96, 80)
    geometry = outpaint_geometry(
        Size(96, 80), OutpaintSpec(left=64, right=32, bottom=48), max_pixels=4096 * 4096
    )
    async with SDFake.start(step_delay=0.01) as fake:
        server = await start_server(
            tmp_path, database_url, extra_env={"IMAGEGEN_SDWEBUI_URL": fake.url}
        )
        try:
            spec = C.GenerationSpec(
                prompt="a wider harbour",
                provider="sdwebui",
                sources=[C.ImageSource(data=png_of(source))],
                outpaint=C.Outpaint(left=64, right=32, bottom=48),
            )
            reply = await rpc(
                server, "generation.SubmitGeneration", E.SubmitGenerationRequest(spec=spec)
            )
            done = await finished(server, reply.generation.name)
        finally:
            server.terminate()
            await server.wait_exit(30)
    assert done.state == E.GENERATION_STATE_COMPLETED, done.error
    ((path, body),) = [call for call in fake.calls if call[0] != "/sdapi/v1/txt2img"]
    assert path == "/sdapi/v1/img2img"
    canvas = geometry.canvas
    assert (body["width"], body["height"]) == (canvas.width, canvas.height)
    assert body["prompt"].startswith("a wider harbour")
    (init_b64,) = body["init_images"]
    init = opened(pybase64.b64decode(init_b64)).convert("RGB")
    assert init.size == (canvas.width, canvas.height)
    assert ImageChops.difference(init.crop(geometry.box), source).getbbox() is None
    mask = opened(pybase64.b64decode(body["mask"]))
    assert mask.mode == "L" and mask.size == init.size
    assert mask.crop(geometry.box).getextrema() == (0, 0), "the source is kept"
    assert mask.histogram()[255] == canvas.pixels - geometry.source.pixels, "the new area"
    (image,) = done.images
    assert (image.width, image.height) == (canvas.width, canvas.height)
    assert image.edit and len(image.parents) == 1


async def test_an_openai_outpaint_job_sends_a_transparent_canvas_and_is_fitted_back(
    tmp_path: Path, database_url: str
) -> None:
    source = gradient(96, 80)
    # 192x208: gpt-image is asked for 1024x1024 with the canvas widened to 208x208.
    geometry = outpaint_geometry(
        Size(96, 80), OutpaintSpec(left=64, right=32, bottom=128), max_pixels=4096 * 4096
    )
    async with OpenAIFake.start() as fake:
        env = {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "sk-test"}
        server = await start_server(tmp_path, database_url, extra_env=env)
        try:
            spec = C.GenerationSpec(
                prompt="the rest of the harbour",
                provider="openai",
                sources=[C.ImageSource(data=png_of(source))],
                outpaint=C.Outpaint(left=64, right=32, bottom=128),
            )
            reply = await rpc(
                server, "generation.SubmitGeneration", E.SubmitGenerationRequest(spec=spec)
            )
            done = await finished(server, reply.generation.name)
            assert done.state == E.GENERATION_STATE_COMPLETED, done.error
            (image,) = done.images
            stored = await download(image.uri)
        finally:
            server.terminate()
            await server.wait_exit(30)
    (call,) = fake.calls
    assert call.is_edit and call.size == "1024x1024"
    (sent_bytes,) = call.images
    sent = opened(sent_bytes)
    assert sent.mode == "RGBA" and sent.size == (208, 208)
    box = (72, 0, 72 + 96, 80)
    assert ImageChops.difference(sent.crop(box).convert("RGB"), source).getbbox() is None
    alpha = sent.getchannel("A")
    assert alpha.crop(box).getextrema() == (255, 255)
    assert alpha.histogram()[0] == 208 * 208 - 96 * 80, "the padding is transparent"
    assert call.mask is not None
    assert opened(call.mask).getchannel("A").tobytes() == alpha.tobytes()
    canvas = geometry.canvas
    assert (image.width, image.height) == (canvas.width, canvas.height) == stored.size


# --- upscale -----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
async def test_an_sdwebui_upscale_job_enlarges_by_the_factor_with_the_chosen_upscaler(
    tmp_path: Path, database_url: str, factor: int
) -> None:
    async with SDFake.start(step_delay=0.01) as fake:
        server = await start_server(
            tmp_path, database_url, extra_env={"IMAGEGEN_SDWEBUI_URL": fake.url}
        )
        try:
            original = await generated(server)
            providers = await rpc(server, "generation.ListProviders", E.ListProvidersRequest())
            sdwebui = next(p for p in providers.providers if p.id == "sdwebui")
            assert "R-ESRGAN 4x+" in sdwebui.upscalers
            before = await balance(server)
            request = E.UpscaleImageRequest(
                image=original.name,
                factor=factor,
                provider="sdwebui",
                upscaler="R-ESRGAN 4x+",
                request_id=f"upscale-{factor}",
            )
            queued = (await rpc(server, "generation.UpscaleImage", request)).generation
            done = await finished(server, queued.name)
            again = (await rpc(server, "generation.UpscaleImage", request)).generation
            after = await balance(server)
            lineage = await rpc(
                server,
                "library.GetImageLineage",
                library_pb2.GetImageLineageRequest(name=done.images[0].name),
            )
            source_pixels = (await download(original.uri)).convert("RGB")
            result = await download(done.images[0].uri)
        finally:
            server.terminate()
            await server.wait_exit(30)
    assert done.state == E.GENERATION_STATE_COMPLETED, done.error
    ((_, body),) = [call for call in fake.calls if call[0] == "/sdapi/v1/extra-single-image"]
    received = opened(pybase64.b64decode(body["image"])).convert("RGB")
    assert ImageChops.difference(received, source_pixels).getbbox() is None
    assert (body["upscaling_resize"], body["upscaler_1"]) == (factor, "R-ESRGAN 4x+")
    (image,) = done.images
    assert (image.width, image.height) == (256 * factor, 256 * factor) == result.size
    assert image.provider == "sdwebui" and image.model == "R-ESRGAN 4x+"
    assert list(image.parents) == [original.name]
    assert [a.image.name for a in lineage.ancestors] == [original.name]
    price = {2: 1, 4: 2}[factor]
    assert again.name == queued.name and done.credits == price
    assert before - after == price, "charged once, also for the repeated request"


async def test_a_running_upscale_is_cancelled_and_charges_nothing(
    tmp_path: Path, database_url: str
) -> None:
    server = await start_server(
        tmp_path, database_url, extra_env={"IMAGEGEN_LOCAL_STEP_DELAY": "1.0"}
    )
    try:
        original = await generated(server)
        before = await balance(server)
        queued = (
            await rpc(
                server,
                "generation.UpscaleImage",
                E.UpscaleImageRequest(image=original.name, factor=4),
            )
        ).generation
        # Wait for the job to run (its STARTED event), then cancel it.
        started = await watch(server, queued.name, stop_after=2)
        assert started[-1].type == E.GENERATION_EVENT_TYPE_STARTED
        await rpc(
            server, "generation.CancelGeneration", E.CancelGenerationRequest(name=queued.name)
        )
        events = await watch(server, queued.name)
        assert events[-1].type == E.GENERATION_EVENT_TYPE_CANCELLED
        assert not any(e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY for e in events)
        done = await finished(server, queued.name)
        assert done.state == E.GENERATION_STATE_CANCELLED and done.credits == 0
        assert await balance(server) == before
        images = await query(database_url, "SELECT id FROM images")
        assert [str(r["id"]) for r in images] == [original.name.removeprefix("images/")]
    finally:
        server.kill()


async def test_an_upscale_killed_mid_job_is_finished_by_another_replica_once(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_LOCAL_STEP_DELAY": "1.0", "IMAGEGEN_LEASE": "2", "IMAGEGEN_MAX_ATTEMPTS": "3"}
    # One data directory for both: the local blob store keeps the source there.
    shared = tmp_path / "shared-data"
    a = await start_server(tmp_path, database_url, name="a", extra_env=env, data_dir=shared)
    b: ServedProcess | None = None
    try:
        original = await generated(a)
        queued = (
            await rpc(
                a,
                "generation.UpscaleImage",
                E.UpscaleImageRequest(image=original.name, factor=2, request_id="up-k9"),
            )
        ).generation
        events = await watch(a, queued.name, stop_after=2)
        assert events[-1].type == E.GENERATION_EVENT_TYPE_STARTED
        a.kill()
        await a.wait_exit(10)
        b = await start_server(tmp_path, database_url, name="b", extra_env=env, data_dir=shared)
        rest = await watch(b, queued.name, after=events[-1].sequence)
        await log_is_gap_free(database_url, queued.name)
        terminal = [e for e in events + rest if e.type in TERMINAL]
        assert [e.type for e in terminal] == [E.GENERATION_EVENT_TYPE_COMPLETED]
        done = await finished(b, queued.name)
        assert (done.state, done.attempts, done.credits) == (E.GENERATION_STATE_COMPLETED, 2, 1)
        (image,) = done.images
        assert (image.width, image.height) == (512, 512)
        assert list(image.parents) == [original.name]
        gid = uuid.UUID(queued.name.removeprefix("generations/"))
        usage = await query(
            database_url,
            "SELECT status, credits FROM usage_records WHERE generation_id = $1",
            gid,
        )
        assert [tuple(u) for u in usage] == [("succeeded", 1)]
        # One reservation in the ledger for the job, kept: the two attempts charged once.
        ledger = await query(
            database_url,
            "SELECT kind, amount FROM credit_ledger WHERE generation_id = $1",
            gid,
        )
        assert [tuple(r) for r in ledger] == [("reserve", -1)]
        # The same request sent again is the same job, charged once.
        again = (
            await rpc(
                b,
                "generation.UpscaleImage",
                E.UpscaleImageRequest(image=original.name, factor=2, request_id="up-k9"),
            )
        ).generation
        assert again.name == queued.name
    finally:
        a.kill()
        if b is not None:
            b.kill()
