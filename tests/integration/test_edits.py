"""Edits through a served process: sources as bytes, data: URLs and library images;
limits at their edges; aspect ratio, parents, and an unchanged source."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from PIL import Image

from imagegen.identity import mint_token
from tests.inprocess import TEST_JWT_KEY, serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, reason_of

E = generation_pb2


def png(width: int, height: int, color: tuple[int, int, int] = (220, 40, 40)) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (width, height), color)
    image.putpixel((0, 0), (0, 255, 0))
    image.save(out, format="PNG")
    return out.getvalue()


def md(user: str = "alice") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user)}"),)


async def run(port: int, spec: common_pb2.GenerationSpec, user: str = "alice"):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        events = [
            r.event
            async for r in stub.GenerateImage(
                E.GenerateImageRequest(spec=spec), metadata=md(user), timeout=60
            )
        ]
    return events


async def fetch_image(server_port: int, event: E.GenerationEvent) -> Image.Image:
    import httpx

    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(event.image.uri)
    reply.raise_for_status()
    return Image.open(io.BytesIO(reply.content))


def ready(events: list[E.GenerationEvent]) -> E.GenerationEvent:
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED, events[-1]
    return next(e for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY)


async def test_edits_from_bytes_data_url_and_the_library(tmp_path: Path, database_url: str) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        port = server.grpc_port
        # Raw bytes: the result keeps the source's 300x200 geometry.
        from_bytes = ready(
            await run(
                port,
                common_pb2.GenerationSpec(
                    prompt="grayscale", sources=[common_pb2.ImageSource(data=png(300, 200))]
                ),
            )
        )
        assert (from_bytes.image.width, from_bytes.image.height) == (300, 200)
        result = (await fetch_image(port, from_bytes)).convert("RGB")
        assert len(set(result.getpixel((100, 100)))) == 1  # type: ignore[arg-type]

        # data: URL whose declared type is wrong: the bytes decide (PNG).
        data_url = "data:image/jpeg;base64," + base64.b64encode(png(120, 80)).decode()
        mirrored = ready(
            await run(
                port,
                common_pb2.GenerationSpec(
                    prompt="mirror", sources=[common_pb2.ImageSource(uri=data_url)]
                ),
            )
        )
        image = (await fetch_image(port, mirrored)).convert("RGB")
        assert image.getpixel((119, 0)) == (0, 255, 0)

        # A library image: the result links to it, and it is left unchanged.
        parent_name = from_bytes.image.name
        conn = await asyncpg.connect(database_url)
        try:
            parent_key = await conn.fetchval(
                "SELECT storage_key FROM images WHERE id = $1",
                uuid.UUID(parent_name.removeprefix("images/")),
            )
            blob_path = next((tmp_path / "data" / "blobs").rglob(Path(parent_key).name))
            before = blob_path.read_bytes()
            child = ready(
                await run(
                    port,
                    common_pb2.GenerationSpec(
                        prompt="crop to square",
                        sources=[common_pb2.ImageSource(image=parent_name)],
                    ),
                )
            )
            assert (child.image.width, child.image.height) == (200, 200)
            parents = await conn.fetch(
                "SELECT parent_id FROM image_parents WHERE image_id = $1",
                uuid.UUID(child.image.name.removeprefix("images/")),
            )
            assert [str(p["parent_id"]) for p in parents] == [parent_name.removeprefix("images/")]
            assert list(child.image.parents) == [parent_name]
            edits = await conn.fetch(
                "SELECT is_edit FROM images WHERE id = $1",
                uuid.UUID(child.image.name.removeprefix("images/")),
            )
            assert edits[0]["is_edit"] is True
            assert blob_path.read_bytes() == before, "the source is never changed"
            usage = await conn.fetch(
                "SELECT credits FROM usage_records ORDER BY completed_at DESC LIMIT 1"
            )
            assert usage[0]["credits"] == 2, "an edit costs 2 credits"
        finally:
            await conn.close()

        # Another user's library image is NOT_FOUND, before any job exists.
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await run(
                port,
                common_pb2.GenerationSpec(
                    prompt="invert", sources=[common_pb2.ImageSource(image=parent_name)]
                ),
                user="bob",
            )
        assert other.value.code() == grpc.StatusCode.NOT_FOUND
        # An instruction the local provider does not understand is IMG_003 at once.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await run(
                port,
                common_pb2.GenerationSpec(
                    prompt="paint it like Monet", sources=[common_pb2.ImageSource(data=png(10, 10))]
                ),
            )
        assert reason_of(unknown.value) == "IMG_003"
        assert "does not understand" in (unknown.value.details() or "")
    conn = await asyncpg.connect(database_url)
    try:
        owners = await conn.fetch("SELECT user_id FROM generations")
    finally:
        await conn.close()
    assert {o["user_id"] for o in owners} == {"alice"}, "refused edits made no job"


def noise_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes(
        "RGB", (width, height), bytes(range(256)) * (width * height * 3 // 256 + 1)
    ).save(out, format="PNG")
    return out.getvalue()


async def test_source_limits_at_and_past_their_edges(tmp_path: Path, database_url: str) -> None:
    # A busy 64x64 image sets the byte limit; a flat 65x64 one stays under it in bytes
    # but is one column past the pixel limit.
    source = noise_png(64, 64)
    assert len(png(65, 64)) < len(source)
    env = {"IMAGEGEN_MAX_INPUT_BYTES": str(len(source)), "IMAGEGEN_MAX_PIXELS": str(64 * 64)}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        port = server.grpc_port
        at_limit = await run(
            port,
            common_pb2.GenerationSpec(
                prompt="invert", sources=[common_pb2.ImageSource(data=source)]
            ),
        )
        assert at_limit[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        for too_big, limit in ((source + b"\x00", "bytes"), (png(65, 64), "pixels")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run(
                    port,
                    common_pb2.GenerationSpec(
                        prompt="invert", sources=[common_pb2.ImageSource(data=too_big)]
                    ),
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason_of(caught.value) == "IMG_007"
            assert limit in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as not_image:
            await run(
                port,
                common_pb2.GenerationSpec(
                    prompt="invert", sources=[common_pb2.ImageSource(data=b"GIF89a....")]
                ),
            )
        assert reason_of(not_image.value) == "IMG_003"


async def test_an_edit_from_an_allowlisted_url_takes_its_type_from_the_bytes(
    tmp_path: Path, database_url: str
) -> None:
    from aiohttp import web

    body = png(90, 30)

    async def serve(_request: web.Request) -> web.Response:
        # The header lies; the bytes are a PNG.
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/cat.jpg", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        env = {"IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1"}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events = await run(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt="flip",
                    sources=[common_pb2.ImageSource(uri=f"http://127.0.0.1:{port}/cat.jpg")],
                ),
            )
            image = ready(events)
            assert (image.image.width, image.image.height) == (90, 30)
        conn = await asyncpg.connect(database_url)
        try:
            spec = await conn.fetchval("SELECT spec FROM generations")
        finally:
            await conn.close()
        import json

        assert json.loads(spec)["sources"][0]["mime_type"] == "image/png"
    finally:
        await runner.cleanup()


async def test_a_url_to_loopback_is_refused_without_the_allowlist(
    tmp_path: Path, database_url: str
) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt="flip", sources=[common_pb2.ImageSource(uri="http://127.0.0.1:9/x.png")]
                ),
            )
    assert reason_of(caught.value) == "IMG_003"


async def test_a_refused_edit_fetches_nothing(tmp_path: Path, database_url: str) -> None:
    import json

    from aiohttp import web

    from tests.fakes import serve_on_loopback

    fetched: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(body=png(16, 16), content_type="image/png")

    app = web.Application()
    app.router.add_get("/src.png", serve)
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"plans": {"free": {"monthly_credits": 1}}}))
    async with serve_on_loopback(app) as url:
        env = {"IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1", "IMAGEGEN_PLANS_FILE": str(plans)}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run(
                    server.grpc_port,
                    common_pb2.GenerationSpec(
                        prompt="invert", sources=[common_pb2.ImageSource(uri=f"{url}/src.png")]
                    ),
                )
    assert reason_of(caught.value) == "IMG_006", "an edit costs 2, the plan grants 1"
    assert fetched == [], "credits are checked before the source URL is fetched"
