"""End to end: `imagegen serve` as a child process, called over a real socket."""

from __future__ import annotations

import io
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2
from PIL import Image

from tests.conftest import list_bucket_keys
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e

E = generation_pb2


def spec(**kwargs: object) -> common_pb2.GenerationSpec:
    base: dict[str, object] = {
        "prompt": "a red fox in snow",
        "style": common_pb2.STYLE_ARTISTIC,
        "size": common_pb2.ImageSize(width=256, height=256),
    }
    base.update(kwargs)
    return common_pb2.GenerationSpec(**base)  # type: ignore[arg-type]


async def collect(server: ServedProcess, request: E.GenerateImageRequest, user: str = "alice"):
    events: list[E.GenerationEvent] = []
    error: grpc.aio.AioRpcError | None = None
    async with server.channel() as channel:
        try:
            async for response in server.stub(channel).GenerateImage(
                request, metadata=server.metadata(user), timeout=60
            ):
                events.append(response.event)
        except grpc.aio.AioRpcError as err:
            error = err
    return events, error


def error_reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status on the error"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "imagegen.v1"
            return info.reason
    raise AssertionError("no ErrorInfo in the status details")


def assert_full_stream(events: list[E.GenerationEvent]) -> None:
    types = [e.type for e in events]
    assert types[0] == E.GENERATION_EVENT_TYPE_QUEUED
    assert types[1] == E.GENERATION_EVENT_TYPE_STARTED
    assert types[-1] == E.GENERATION_EVENT_TYPE_COMPLETED
    sequences = [e.sequence for e in events]
    assert sequences == list(range(1, len(events) + 1)), "sequence numbers rise with no gaps"
    progress = [e for e in events if e.type == E.GENERATION_EVENT_TYPE_PROGRESS]
    with_preview = [e for e in progress if e.progress.preview]
    assert len(with_preview) >= 3
    percents = [e.progress.percent for e in progress]
    assert percents == sorted(percents) and percents[0] < percents[-1]
    previews = [bytes(e.progress.preview) for e in with_preview]
    for preview in previews:
        Image.open(io.BytesIO(preview)).load()
    assert len(set(previews)) == len(previews), "previews differ from step to step"
    ready = [e for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY]
    assert len(ready) == 1
    assert types.index(E.GENERATION_EVENT_TYPE_IMAGE_READY) > types.index(
        E.GENERATION_EVENT_TYPE_STARTED
    )


async def rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@pytest.fixture
async def s3_server(tmp_path: Path, database_url: str, s3_endpoint: str, s3_bucket: str):
    server = await start_server(
        tmp_path,
        database_url,
        extra_env={
            "IMAGEGEN_S3_ENDPOINT": s3_endpoint,
            "IMAGEGEN_S3_BUCKET": s3_bucket,
            "IMAGEGEN_S3_REGION": "us-east-1",
            "IMAGEGEN_URL_TTL": "600",
        },
    )
    yield server
    server.kill()


@pytest.fixture
async def local_server(tmp_path: Path, database_url: str):
    server = await start_server(tmp_path, database_url, extra_env={"IMAGEGEN_URL_TTL": "3"})
    yield server
    server.kill()


async def test_generate_image_streams_every_stage_and_stores_in_s3(
    s3_server: ServedProcess, database_url: str, s3_endpoint: str, s3_bucket: str
) -> None:
    events, error = await collect(s3_server, E.GenerateImageRequest(spec=spec()))
    assert error is None
    assert_full_stream(events)
    image = next(e.image for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY)
    assert (image.width, image.height, image.mime_type) == (256, 256, "image/png")
    assert "X-Amz-Expires=600" in image.uri

    image_rows = await rows(database_url, "SELECT * FROM images")
    assert len(image_rows) == 1
    key = image_rows[0]["storage_key"]
    assert key.startswith("generated/alice/")
    assert await list_bucket_keys(s3_endpoint, s3_bucket) == [key]
    usage = await rows(database_url, "SELECT * FROM usage_records")
    assert [(u["status"], u["credits"], u["user_id"]) for u in usage] == [("succeeded", 1, "alice")]

    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(image.uri)
    assert reply.status_code == 200
    Image.open(io.BytesIO(reply.content)).verify()
    assert len(reply.content) == image.size_bytes


async def test_generate_image_with_the_local_store_and_signed_urls(
    local_server: ServedProcess, database_url: str
) -> None:
    events, error = await collect(
        local_server, E.GenerateImageRequest(spec=spec(format=common_pb2.IMAGE_FORMAT_WEBP))
    )
    assert error is None
    assert_full_stream(events)
    image = next(e.image for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY)
    assert image.mime_type == "image/webp"
    blob_files = [p for p in (local_server.data_dir / "blobs").rglob("*") if p.is_file()]
    stored = [p for p in blob_files if p.suffix == ".webp"]
    assert len(stored) == 1
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(image.uri)
        assert reply.status_code == 200
        assert reply.content == stored[0].read_bytes()
        assert Image.open(io.BytesIO(reply.content)).format == "WEBP"
        tampered = image.uri[:-1] + ("0" if image.uri[-1] != "0" else "1")
        assert (await http.get(tampered)).status_code == 403
        # IMAGEGEN_URL_TTL=3: the same URL is refused once it has expired.
        import asyncio

        await asyncio.sleep(4)
        assert (await http.get(image.uri)).status_code in (403, 410)

    # GetGeneration for the owner; NOT_FOUND for another user.
    generation = events[0].generation
    async with local_server.channel() as channel:
        stub = local_server.stub(channel)
        got = await stub.GetGeneration(
            E.GetGenerationRequest(name=generation), metadata=local_server.metadata("alice")
        )
        assert got.generation.state == E.GENERATION_STATE_COMPLETED
        assert len(got.generation.images) == 1
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub.GetGeneration(
                E.GetGenerationRequest(name=generation), metadata=local_server.metadata("bob")
            )
        assert other.value.code() == grpc.StatusCode.NOT_FOUND


async def test_invalid_requests_are_refused_at_once_with_no_job(
    local_server: ServedProcess, database_url: str
) -> None:
    valid_edges = [
        spec(prompt="x" * 4000),
        spec(negative_prompt="n" * 1000),
        spec(count=4),
    ]
    invalid = [
        ("prompt", spec(prompt="")),
        ("prompt", spec(prompt="   ")),
        ("prompt", spec(prompt="x" * 4001)),
        ("negative_prompt", spec(negative_prompt="n" * 1001)),
        ("count", spec(count=5)),
        ("count", spec(count=-1)),
        ("size", spec(size=common_pb2.ImageSize(width=300, height=300))),
        ("size", spec(size=common_pb2.ImageSize(width=4096, height=4096))),
        ("format", spec(format=99)),
        ("style", spec(style=42)),
        ("provider", spec(provider="nope")),
    ]
    async with local_server.channel() as channel:
        stub = local_server.stub(channel)
        for field, bad in invalid:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.GenerateImage(
                    E.GenerateImageRequest(spec=bad), metadata=local_server.metadata()
                ):
                    raise AssertionError(f"{field}: an event was sent for an invalid request")
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert error_reason(caught.value) == "IMG_003", field
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitGeneration(
                E.SubmitGenerationRequest(spec=spec(), request_id="bad id with spaces"),
                metadata=local_server.metadata(),
            )
        assert error_reason(caught.value) == "IMG_003"
    assert await rows(database_url, "SELECT id FROM generations") == []

    async with local_server.channel() as channel:
        stub = local_server.stub(channel)
        for good in valid_edges:
            reply = await stub.SubmitGeneration(
                E.SubmitGenerationRequest(spec=good), metadata=local_server.metadata()
            )
            assert reply.generation.state in (
                E.GENERATION_STATE_QUEUED,
                E.GENERATION_STATE_RUNNING,
            )
    assert len(await rows(database_url, "SELECT id FROM generations")) == len(valid_edges)


async def test_missing_or_bad_tokens_are_unauthenticated(
    local_server: ServedProcess, database_url: str
) -> None:
    from datetime import UTC, datetime, timedelta

    from imagegen.identity import mint_token

    expired = local_server.token(
        "alice", lifetime=timedelta(hours=1), now=datetime.now(UTC) - timedelta(hours=2)
    )
    wrong_key = mint_token("another-key-0123456789abcdef0123456789abcdef", user_id="alice")
    import base64
    import json

    def b64(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    alg_none = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'alice', 'exp': 4102444800})}."
    cases = [
        (),
        (("authorization", "Bearer " + expired),),
        (("authorization", "Bearer " + wrong_key),),
        (("authorization", "Bearer " + alg_none),),
        (("authorization", "Basic abc"),),
    ]
    async with local_server.channel() as channel:
        stub = local_server.stub(channel)
        for metadata in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(spec=spec()), metadata=metadata
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await rows(database_url, "SELECT id FROM generations") == []


async def test_reflection_and_health_need_no_token(local_server: ServedProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with local_server.channel() as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        services: set[str] = set()
        async for reply in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            services |= {s.name for s in reply.list_services_response.service}
        assert {
            "imagegen.v1.ImageGenerationService",
            "imagegen.v1.ImageLibraryService",
            "imagegen.v1.PromptTemplateService",
            "imagegen.v1.UsageService",
            "grpc.health.v1.Health",
        } <= services
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "imagegen.v1.ImageGenerationService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
