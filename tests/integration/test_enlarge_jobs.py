"""Outpainting and upscaling as jobs, on the `local` provider through a served server:
the size made, the source kept and the new area filled, lineage, prices and quotes,
idempotency, and every refusal at submit (no job, no charge)."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from PIL import Image, ImageChops

from imagegen.domain.enlarge import UPSCALE_PROMPT, outpaint_geometry
from imagegen.domain.models import OutpaintAnchor, OutpaintSpec, Size
from imagegen.providers import outpainting
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, metadata, reason_of

E = generation_pb2
C = common_pb2


def gradient(width: int, height: int) -> Image.Image:
    """Colourful and never black, so a black or transparent pixel is a hole."""
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


class Caller:
    """The three services a test here talks to, as one user."""

    def __init__(self, channel: grpc.aio.Channel, user: str = "alice") -> None:
        self.generations: Any = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        self.library: Any = library_pb2_grpc.ImageLibraryServiceStub(channel)
        self.usage: Any = usage_pb2_grpc.UsageServiceStub(channel)
        self.metadata = metadata(user)

    async def run(self, spec: C.GenerationSpec) -> list[E.GenerationEvent]:
        call = self.generations.GenerateImage(
            E.GenerateImageRequest(spec=spec), metadata=self.metadata, timeout=60
        )
        return [response.event async for response in call]

    async def upscale(self, **fields: Any) -> E.Generation:
        reply = await self.generations.UpscaleImage(
            E.UpscaleImageRequest(**fields), metadata=self.metadata, timeout=30
        )
        return reply.generation  # type: ignore[no-any-return]

    async def finished(self, name: str) -> E.Generation:
        async for _ in self.generations.WatchGeneration(
            E.WatchGenerationRequest(name=name), metadata=self.metadata, timeout=60
        ):
            pass
        reply = await self.generations.GetGeneration(
            E.GetGenerationRequest(name=name), metadata=self.metadata, timeout=30
        )
        return reply.generation  # type: ignore[no-any-return]

    async def balance(self) -> int:
        reply = await self.usage.GetCreditBalance(
            usage_pb2.GetCreditBalanceRequest(), metadata=self.metadata, timeout=30
        )
        return int(reply.balance.available_credits)


async def download(uri: str) -> Image.Image:
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(uri)
    reply.raise_for_status()
    with Image.open(io.BytesIO(reply.content)) as image:
        image.load()
        return image


def image_ready(events: list[E.GenerationEvent]) -> C.Image:
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED, events[-1]
    return next(e for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY).image


async def count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


@pytest.fixture
async def port(tmp_path: Path, database_url: str) -> AsyncIterator[int]:
    async with serve_in_process(tmp_path, database_url) as server:
        yield server.grpc_port


@pytest.fixture
async def caller(port: int) -> AsyncIterator[Caller]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
        yield Caller(ch)


# --- outpaint ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outpaint", "domain"),
    [
        (
            C.Outpaint(left=32, top=0, right=16, bottom=24),
            OutpaintSpec(left=32, top=0, right=16, bottom=24),
        ),
        (
            C.Outpaint(
                target_size=C.ImageSize(width=160, height=96),
                anchor=C.OUTPAINT_ANCHOR_TOP_RIGHT,
            ),
            OutpaintSpec(target=Size(160, 96), anchor=OutpaintAnchor.TOP_RIGHT),
        ),
    ],
    ids=["sides", "target"],
)
async def test_a_local_outpaint_keeps_the_source_inside_and_fills_the_new_area(
    caller: Caller, outpaint: C.Outpaint, domain: OutpaintSpec
) -> None:
    source = gradient(96, 80)
    spec = C.GenerationSpec(
        prompt="the beach goes on",
        provider="local",
        sources=[C.ImageSource(data=png_of(source))],
        outpaint=outpaint,
    )
    events = await caller.run(spec)
    made = image_ready(events)
    geometry = outpaint_geometry(Size(96, 80), domain, max_pixels=4096 * 4096)
    assert (made.width, made.height) == (geometry.canvas.width, geometry.canvas.height)
    result = (await download(made.uri)).convert("RGB")
    assert result.size == (geometry.canvas.width, geometry.canvas.height)
    # The source, pixel for pixel, where the outpaint puts it.
    assert ImageChops.difference(result.crop(geometry.box), source).getbbox() is None
    # The new area is filled: no hole, and exactly the documented deterministic fill.
    new_area = outpainting.repaint_mask(geometry)
    assert min(min(band) for band in result.getextrema()) > 0, "no black hole"
    expected = outpainting.filled(source, geometry)
    assert ImageChops.difference(result, expected).getbbox() is None
    assert new_area.histogram()[255] == geometry.canvas.pixels - geometry.source.pixels
    # Lineage and price as an edit; the job shows the outpaint and the size it made.
    assert made.edit and len(made.parents) == 1
    generation = await caller.finished(events[0].generation)
    assert generation.spec.outpaint.left == outpaint.left
    assert (generation.spec.size.width, generation.spec.size.height) == (
        geometry.canvas.width,
        geometry.canvas.height,
    )
    assert generation.credits == 2 and generation.edit


async def test_an_outpaint_past_the_limits_is_refused_at_submit_and_leaves_nothing(
    caller: Caller, database_url: str
) -> None:
    big = png_of(gradient(64, 64))
    refusals = [
        (C.Outpaint(left=4096 - 64 + 1), "IMG_003", grpc.StatusCode.INVALID_ARGUMENT),
        (C.Outpaint(left=2049), "IMG_003", grpc.StatusCode.INVALID_ARGUMENT),
        (C.Outpaint(), "IMG_003", grpc.StatusCode.INVALID_ARGUMENT),
        (
            C.Outpaint(target_size=C.ImageSize(width=32, height=128)),
            "IMG_003",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for outpaint, code, status in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller.run(
                C.GenerationSpec(
                    prompt="more", sources=[C.ImageSource(data=big)], outpaint=outpaint
                )
            )
        assert (caught.value.code(), reason_of(caught.value)) == (status, code), outpaint
    # Two sources, a mask, none at all.
    for spec in (
        C.GenerationSpec(
            prompt="more",
            sources=[C.ImageSource(data=big)] * 2,
            outpaint=C.Outpaint(left=8),
        ),
        C.GenerationSpec(
            prompt="more",
            sources=[C.ImageSource(data=big)],
            mask=C.ImageSource(data=big),
            outpaint=C.Outpaint(left=8),
        ),
        C.GenerationSpec(prompt="more", outpaint=C.Outpaint(left=8)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller.run(spec)
        assert reason_of(caught.value) == "IMG_003"
    assert await count(database_url, "SELECT count(*) FROM generations") == 0
    assert await count(database_url, "SELECT count(*) FROM images") == 0


async def test_an_outpaint_past_the_pixel_limit_is_img_007_at_submit(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_MAX_PIXELS": str(128 * 128)}
    async with (
        serve_in_process(tmp_path, database_url, env=env) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        caller = Caller(ch)
        source = [C.ImageSource(data=png_of(gradient(100, 100)))]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller.run(
                C.GenerationSpec(prompt="more", sources=source, outpaint=C.Outpaint(right=64))
            )
        assert reason_of(caught.value) == "IMG_007"
        # At the limit exactly it runs.
        made = image_ready(
            await caller.run(
                C.GenerationSpec(prompt="more", sources=source, outpaint=C.Outpaint(right=28))
            )
        )
        assert (made.width, made.height) == (128, 100)
    assert await count(database_url, "SELECT count(*) FROM generations") == 1


@pytest.mark.parametrize("provider", ["forge", "openai"])
async def test_outpaint_and_upscale_on_a_provider_without_the_capability_are_refused(
    tmp_path: Path, database_url: str, provider: str
) -> None:
    env = {
        "BUILT_IN_FORGE_API_URL": "http://127.0.0.1:9/forge",
        "BUILT_IN_FORGE_API_KEY": "k",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_API_KEY": "k",
    }
    async with (
        serve_in_process(tmp_path, database_url, env=env) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        caller = Caller(ch)
        source = [C.ImageSource(data=png_of(gradient(64, 64)))]
        if provider == "forge":
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await caller.run(
                    C.GenerationSpec(
                        prompt="more",
                        provider=provider,
                        sources=source,
                        outpaint=C.Outpaint(left=8),
                    )
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason_of(caught.value) == "IMG_003"
            assert "cannot extend" in (caught.value.details() or "")
        made = image_ready(
            await caller.run(
                C.GenerationSpec(
                    prompt="a fox", provider="local", size=C.ImageSize(width=256, height=256)
                )
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller.upscale(image=made.name, factor=2, provider=provider)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(caught.value) == "IMG_003"
        assert "cannot upscale" in (caught.value.details() or "")
    assert await count(database_url, "SELECT count(*) FROM generations") == 1


async def test_quotes_price_outpaints_as_edits_of_their_size_and_upscales_by_factor(
    caller: Caller,
) -> None:
    made = image_ready(
        await caller.run(
            C.GenerationSpec(prompt="a fox", size=C.ImageSize(width=1024, height=1024))
        )
    )

    async def quote(spec: C.GenerationSpec) -> int:
        reply = await caller.generations.QuoteGeneration(
            E.QuoteGenerationRequest(spec=spec), metadata=caller.metadata, timeout=30
        )
        return int(reply.credits)

    library = [C.ImageSource(image=made.name)]
    # 1024x1024 + 512 on the right = 1536x1024: the third tier.
    assert (
        await quote(C.GenerationSpec(prompt="x", sources=library, outpaint=C.Outpaint(right=512)))
        == 3
    )
    small = [C.ImageSource(data=png_of(gradient(64, 64)))]
    assert (
        await quote(C.GenerationSpec(prompt="x", sources=small, outpaint=C.Outpaint(right=8))) == 2
    )
    # A URL is not fetched for a quote: sides are added to 1024x1024.
    by_url = [C.ImageSource(uri="https://images.example/a.png")]
    assert (
        await quote(C.GenerationSpec(prompt="x", sources=by_url, outpaint=C.Outpaint(right=512)))
        == 3
    )
    target = C.Outpaint(target_size=C.ImageSize(width=2048, height=2048))
    assert await quote(C.GenerationSpec(prompt="x", sources=by_url, outpaint=target)) == 6
    for factor, credits in ((2, 1), (4, 2)):
        upscale = C.GenerationSpec(
            prompt=UPSCALE_PROMPT, sources=library, upscale=C.Upscale(factor=factor)
        )
        assert await quote(upscale) == credits


# --- upscale -----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
async def test_a_local_upscale_is_a_new_image_of_the_factors_size_with_its_parent(
    caller: Caller, database_url: str, factor: int
) -> None:
    original = image_ready(
        await caller.run(C.GenerationSpec(prompt="a fox", size=C.ImageSize(width=256, height=256)))
    )
    before = await caller.balance()
    queued = await caller.upscale(image=original.name, factor=factor, request_id=f"up-{factor}")
    assert queued.state == E.GENERATION_STATE_QUEUED
    assert queued.edit and queued.spec.upscale.factor == factor
    assert queued.spec.prompt == UPSCALE_PROMPT
    assert [s.image for s in queued.spec.sources] == [original.name]
    assert (queued.spec.size.width, queued.spec.size.height) == (256 * factor, 256 * factor)
    price = {2: 1, 4: 2}[factor]
    assert queued.credits == price
    done = await caller.finished(queued.name)
    assert done.state == E.GENERATION_STATE_COMPLETED
    (made,) = done.images
    assert (made.width, made.height) == (256 * factor, 256 * factor)
    assert made.mime_type == "image/png" and made.model == "lanczos"
    assert list(made.parents) == [original.name] and made.credits == price
    picture = await download(made.uri)
    assert picture.size == (256 * factor, 256 * factor)
    lineage = await caller.library.GetImageLineage(
        library_pb2.GetImageLineageRequest(name=made.name), metadata=caller.metadata, timeout=30
    )
    assert [a.image.name for a in lineage.ancestors] == [original.name]
    # Charged once, also when the same request is sent again.
    again = await caller.upscale(image=original.name, factor=factor, request_id=f"up-{factor}")
    assert again.name == queued.name and again.state == E.GENERATION_STATE_COMPLETED
    assert await caller.balance() == before - price
    assert await count(database_url, "SELECT count(*) FROM generations") == 2
    # The same request_id for another factor is IMG_009.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await caller.upscale(image=original.name, factor=6 - factor, request_id=f"up-{factor}")
    assert reason_of(caught.value) == "IMG_009"


async def test_an_upscale_keeps_the_sources_format_unless_told(caller: Caller) -> None:
    original = image_ready(
        await caller.run(
            C.GenerationSpec(
                prompt="a fox",
                size=C.ImageSize(width=256, height=256),
                format=C.IMAGE_FORMAT_WEBP,
            )
        )
    )
    kept = await caller.finished((await caller.upscale(image=original.name, factor=2)).name)
    assert kept.images[0].mime_type == "image/webp"
    told = await caller.finished(
        (await caller.upscale(image=original.name, factor=2, format=C.IMAGE_FORMAT_JPEG)).name
    )
    assert told.images[0].mime_type == "image/jpeg"


async def test_upscale_refusals_at_submit(tmp_path: Path, database_url: str) -> None:
    env = {"IMAGEGEN_MAX_PIXELS": str(1024 * 1024)}
    async with (
        serve_in_process(tmp_path, database_url, env=env) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        alice, bob = Caller(ch), Caller(ch, "bob")
        small = image_ready(
            await alice.run(
                C.GenerationSpec(prompt="a fox", size=C.ImageSize(width=256, height=256))
            )
        )
        large = image_ready(
            await alice.run(
                C.GenerationSpec(prompt="a fox", size=C.ImageSize(width=512, height=512))
            )
        )
        jobs = await count(database_url, "SELECT count(*) FROM generations")

        async def refused(caller: Caller, **fields: Any) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await caller.upscale(**fields)
            return caught.value

        other = await refused(bob, image=small.name, factor=2)
        assert other.code() == grpc.StatusCode.NOT_FOUND
        missing = await refused(alice, image=f"images/{uuid.uuid4()}", factor=2)
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        for fields, field in (
            ({"image": small.name, "factor": 3}, "factor"),
            ({"image": small.name, "factor": 0}, "factor"),
            ({"image": small.name, "factor": 2, "upscaler": "R-ESRGAN 4x+"}, "upscaler"),
            ({"image": small.name, "factor": 2, "provider": "nope"}, "provider"),
            ({"image": "", "factor": 2}, "image"),
            ({"image": small.name, "factor": 2, "request_id": "bad id"}, "request_id"),
        ):
            error = await refused(alice, **fields)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert reason_of(error) == "IMG_003", fields
            assert field_of(error) == field, fields
        # 4x of 512x512 is 2048x2048, past IMAGEGEN_MAX_PIXELS; 2x reaches it exactly.
        too_big = await refused(alice, image=large.name, factor=4)
        assert (too_big.code(), reason_of(too_big)) == (grpc.StatusCode.INVALID_ARGUMENT, "IMG_007")
        assert await count(database_url, "SELECT count(*) FROM generations") == jobs
        fits = await alice.finished((await alice.upscale(image=large.name, factor=2)).name)
        assert (fits.images[0].width, fits.images[0].height) == (1024, 1024)
        # A soft-deleted image: FAILED_PRECONDITION, until it is undeleted.
        await alice.library.DeleteImage(
            library_pb2.DeleteImageRequest(name=small.name), metadata=alice.metadata, timeout=30
        )
        deleted = await refused(alice, image=small.name, factor=2)
        assert (deleted.code(), reason_of(deleted)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "IMG_003",
        )
        await alice.library.UndeleteImage(
            library_pb2.UndeleteImageRequest(name=small.name), metadata=alice.metadata, timeout=30
        )
        assert (await alice.upscale(image=small.name, factor=2)).state == E.GENERATION_STATE_QUEUED


def field_of(err: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.metadata.get("field", "")
    return ""


async def test_outpaint_and_upscale_jobs_run_again_as_they_were(caller: Caller) -> None:
    original = image_ready(
        await caller.run(C.GenerationSpec(prompt="a fox", size=C.ImageSize(width=256, height=256)))
    )
    outpainted = image_ready(
        await caller.run(
            C.GenerationSpec(
                prompt="more",
                sources=[C.ImageSource(image=original.name)],
                outpaint=C.Outpaint(left=64),
            )
        )
    )
    upscaled = await caller.finished((await caller.upscale(image=original.name, factor=2)).name)
    for job, size in ((outpainted.generation, (320, 256)), (upscaled.name, (512, 512))):
        reply = await caller.generations.RerunGeneration(
            E.RerunGenerationRequest(name=job), metadata=caller.metadata, timeout=30
        )
        again = await caller.finished(reply.generation.name)
        assert again.state == E.GENERATION_STATE_COMPLETED, again.error
        (image,) = again.images
        assert (image.width, image.height) == size
        assert list(image.parents) == [original.name]


async def test_an_upscale_has_no_text_of_the_callers_to_moderate(
    tmp_path: Path, database_url: str
) -> None:
    from tests.fakes.openai_moderation_server import ModerationFake

    async with ModerationFake.start() as moderator:
        env = {
            "IMAGEGEN_MODERATION_CHAIN": "openai",
            "IMAGEGEN_MODERATION_URL": moderator.url,
            "IMAGEGEN_MODERATION_API_KEY": "mod-key",
        }
        async with (
            serve_in_process(tmp_path, database_url, env=env) as server,
            grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as ch,
        ):
            caller = Caller(ch)
            original = image_ready(
                await caller.run(
                    C.GenerationSpec(prompt="a fox", size=C.ImageSize(width=256, height=256))
                )
            )
            assert len(moderator.requests) == 1
            done = await caller.finished((await caller.upscale(image=original.name, factor=2)).name)
            assert done.state == E.GENERATION_STATE_COMPLETED
            assert len(moderator.requests) == 1, "the fixed prompt is not sent to moderation"
            # An outpaint's prompt is the caller's, and is moderated.
            image_ready(
                await caller.run(
                    C.GenerationSpec(
                        prompt="more sea",
                        sources=[C.ImageSource(image=original.name)],
                        outpaint=C.Outpaint(right=16),
                    )
                )
            )
            assert len(moderator.requests) == 2
