"""The generation pipeline through a real server in this process: the Forge provider
against its wire-format fake, faults in S3 and PostgreSQL, and what reaches the caller."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.conftest import list_bucket_keys
from tests.fakes.forge_server import ForgeFake, Reply, bomb_png, png_bytes
from tests.inprocess import TEST_JWT_KEY, serve_in_process

E = generation_pb2
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


def metadata(user: str = "alice") -> tuple[tuple[str, str], ...]:
    from imagegen.identity import mint_token

    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user)}"),)


async def generate(port: int, spec: common_pb2.GenerationSpec, extra_metadata=()):
    events: list[E.GenerationEvent] = []
    error: grpc.aio.AioRpcError | None = None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        try:
            async for response in stub.GenerateImage(
                E.GenerateImageRequest(spec=spec),
                metadata=metadata() + tuple(extra_metadata),
                timeout=60,
            ):
                events.append(response.event)
        except grpc.aio.AioRpcError as err:
            error = err
    return events, error


def reason_of(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo")


def forge_spec(**kwargs: object) -> common_pb2.GenerationSpec:
    values: dict[str, object] = {
        "prompt": "a red fox in snow",
        "provider": "forge",
        "size": common_pb2.ImageSize(width=512, height=512),
    }
    values.update(kwargs)
    return common_pb2.GenerationSpec(**values)  # type: ignore[arg-type]


async def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def assert_failed_with(
    events: list[E.GenerationEvent], err: grpc.aio.AioRpcError | None, code: str
):
    assert events, "the job was accepted and streamed events"
    assert events[-1].type == E.GENERATION_EVENT_TYPE_FAILED
    assert events[-1].error.code == code
    assert err is not None, "GenerateImage ends with the failure's status"
    assert reason_of(err) == code


@pytest.fixture
def s3_env(s3_endpoint: str, s3_bucket: str) -> dict[str, str]:
    return {"IMAGEGEN_S3_ENDPOINT": s3_endpoint, "IMAGEGEN_S3_BUCKET": s3_bucket}


async def test_forge_generation_is_stored(
    tmp_path: Path, database_url: str, s3_env: dict[str, str], s3_endpoint: str, s3_bucket: str
) -> None:
    async with ForgeFake.start() as fake:
        fake.default = Reply(image=png_bytes(512, 512))
        env = {**s3_env, "BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k-123"}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(
                server.grpc_port,
                forge_spec(negative_prompt="blur", style=common_pb2.STYLE_WATERCOLOR),
            )
    assert err is None
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    assert len(fake.requests) == 1
    seen = fake.requests[0]
    assert seen.headers["Authorization"] == "Bearer k-123"
    assert seen.json["prompt"].startswith("a red fox in snow, watercolor style")
    assert seen.json["prompt"].endswith("Avoid: blur")
    images = await fetch(database_url, "SELECT provider, storage_key FROM images")
    assert [r["provider"] for r in images] == ["forge"]
    assert await list_bucket_keys(s3_endpoint, s3_bucket) == [images[0]["storage_key"]]


async def test_forge_without_credentials_is_img_001_and_sends_nothing(
    tmp_path: Path, database_url: str
) -> None:
    async with ForgeFake.start() as fake:
        env = {"BUILT_IN_FORGE_API_URL": fake.url}  # no key
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(server.grpc_port, forge_spec())
    # Refused at submit (tests/integration/test_provider_not_configured.py has the rest).
    assert events == []
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(err) == "IMG_001"
    assert fake.requests == []
    assert await fetch(database_url, "SELECT id FROM generations") == []
    assert await fetch(database_url, "SELECT id FROM usage_records") == []


@pytest.mark.parametrize(
    "reply",
    [
        Reply(body=b'{"image": {"b64Json": "!!!not base64!!!", "mimeType": "image/png"}}'),
        Reply(body=b"<html>gateway</html>"),
        Reply(image=b"these bytes are not an image at all"),
        Reply(image=bomb_png()),
        Reply(image=png_bytes(5000, 5000)),  # over IMAGEGEN_MAX_PIXELS below Pillow's own limit
    ],
    ids=["bad-base64", "not-json", "not-an-image", "decompression-bomb", "over-pixel-limit"],
)
async def test_unusable_forge_replies_are_img_002_and_store_nothing(
    tmp_path: Path,
    database_url: str,
    s3_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    reply: Reply,
) -> None:
    async with ForgeFake.start() as fake:
        fake.default = reply
        env = {**s3_env, "BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k"}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(server.grpc_port, forge_spec())
    assert_failed_with(events, err, "IMG_002")
    assert await fetch(database_url, "SELECT id FROM images") == []
    assert await list_bucket_keys(s3_endpoint, s3_bucket) == []


async def test_s3_endpoint_down_is_img_004(tmp_path: Path, database_url: str) -> None:
    from aiobotocore.session import get_session
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1"
    ) as s3:
        await s3.create_bucket(Bucket=bucket)
    env = {"IMAGEGEN_S3_ENDPOINT": endpoint, "IMAGEGEN_S3_BUCKET": bucket}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        moto.stop()
        events, err = await generate(
            server.grpc_port,
            common_pb2.GenerationSpec(
                prompt="a fox", size=common_pb2.ImageSize(width=256, height=256)
            ),
        )
    assert_failed_with(events, err, "IMG_004")
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    assert await fetch(database_url, "SELECT id FROM images") == []


async def test_database_failure_after_upload_leaves_no_blob(
    tmp_path: Path, database_url: str, s3_env: dict[str, str], s3_endpoint: str, s3_bucket: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # A real fault inside PostgreSQL: the image row's insert fails after the upload.
        await conn.execute(
            """
            CREATE FUNCTION refuse_images() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
            CREATE TRIGGER refuse_images BEFORE INSERT ON images
                FOR EACH ROW EXECUTE FUNCTION refuse_images();
            """
        )
    finally:
        await conn.close()
    async with serve_in_process(tmp_path, database_url, env=s3_env) as server:
        events, err = await generate(
            server.grpc_port,
            common_pb2.GenerationSpec(
                prompt="a fox", size=common_pb2.ImageSize(width=256, height=256)
            ),
        )
    assert_failed_with(events, err, "IMG_004")
    assert await fetch(database_url, "SELECT id FROM images") == []
    assert await list_bucket_keys(s3_endpoint, s3_bucket) == []


async def test_forge_503_then_success_stores_one_image(
    tmp_path: Path, database_url: str, s3_env: dict[str, str], s3_endpoint: str, s3_bucket: str
) -> None:
    async with ForgeFake.start() as fake:
        fake.script(Reply(status=503, body=b"{}"))
        fake.default = Reply(image=png_bytes(512, 512))
        env = {**s3_env, "BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k"}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(server.grpc_port, forge_spec())
    assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    assert len(fake.requests) == 2, "the 503 was retried once"
    assert len(await fetch(database_url, "SELECT id FROM images")) == 1
    assert len(await list_bucket_keys(s3_endpoint, s3_bucket)) == 1
    usage = await fetch(database_url, "SELECT status FROM usage_records")
    assert [u["status"] for u in usage] == ["succeeded"]


async def test_forge_edit_sends_original_images(tmp_path: Path, database_url: str) -> None:
    import pybase64

    source = png_bytes(48, 48, (10, 20, 30))
    async with ForgeFake.start() as fake:
        env = {"BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k"}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt="turn the sky pink",
                    provider="forge",
                    sources=[common_pb2.ImageSource(data=source)],
                ),
            )
    assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    sent = fake.requests[0].json
    assert sent["prompt"] == "turn the sky pink"
    assert sent["original_images"] == [
        {"b64Json": pybase64.b64encode(source).decode(), "mimeType": "image/png"}
    ]
