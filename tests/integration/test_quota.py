"""The storage quota: a user at it is refused at submit (IMG_008: no job, no charge, no
rate-limit slot), and when two jobs of one user store their images at the same moment
over the quota, exactly one image is kept; the other job ends IMG_008 and leaves no blob."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import httpx
from aiohttp import web
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc, usage_pb2, usage_pb2_grpc

from tests.conftest import list_bucket_keys
from tests.fakes import serve_on_loopback
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, generate, metadata, reason_of

E = generation_pb2
SMALL = common_pb2.ImageSize(width=256, height=256)
#: Hop-by-hop and length headers the proxy does not copy (the next hop sets its own).
SKIPPED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "expect"}


class PutGate:
    """An S3 endpoint in front of moto that holds every image PUT until the test opens
    the gate, and lets a test wait until a number of them are held: the jobs that sent
    them go on together (or in the order the test chooses)."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._client = httpx.AsyncClient(trust_env=False, timeout=30)
        self._changed = asyncio.Condition()
        self.held = 0
        self.gate = asyncio.Event()

    async def wait_held(self, count: int) -> None:
        """Until `count` image PUTs have arrived."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.held >= count)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "PUT" and "/generated/" in request.path:
            async with self._changed:
                self.held += 1
                self._changed.notify_all()
            await self.gate.wait()
        reply = await self._client.request(
            request.method,
            self._target + request.path_qs,
            content=body,
            headers={k: v for k, v in request.headers.items() if k.lower() not in SKIPPED_HEADERS},
        )
        return web.Response(
            status=reply.status_code,
            body=reply.content,
            headers={
                k: v
                for k, v in reply.headers.items()
                if k.lower() not in SKIPPED_HEADERS | {"content-encoding"}
            },
        )

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        try:
            async with serve_on_loopback(app) as url:
                yield url
        finally:
            await self._client.aclose()


async def last_events(
    stub: generation_pb2_grpc.ImageGenerationServiceStub, name: str, user: str
) -> list[E.GenerationEvent]:
    """Every event of a job, from its first to its terminal one."""
    return [
        r.event
        async for r in stub.WatchGeneration(
            E.WatchGenerationRequest(name=name), metadata=metadata(user), timeout=60
        )
    ]


def plans(tmp_path: Path, **free: int | None) -> dict[str, str]:
    limits = {"requests_per_hour": None, "requests_per_day": None, "concurrent": None}
    path = tmp_path / f"plans-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"plans": {"free": {**limits, "monthly_credits": 100, **free}}}))
    return {"IMAGEGEN_PLANS_FILE": str(path)}


async def fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def test_a_user_at_the_quota_is_refused_at_submit_with_nothing_taken(
    tmp_path: Path, database_url: str
) -> None:
    await fetch(
        database_url,
        "INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes, "
        "provider, prompt) VALUES (gen_random_uuid(), 'alice', 'k/full', 'image/png', 8, 8, "
        "1000000, 'local', 'old')",
    )
    env = plans(tmp_path, storage_bytes=1_000_000, requests_per_hour=1)
    spec = common_pb2.GenerationSpec(prompt="a fox", size=SMALL)
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        events, err = await generate(server.grpc_port, spec)
        assert events == [], "refused before a job exists"
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(err) == "IMG_008"
        assert await fetch(database_url, "SELECT id FROM generations") == []
        assert await fetch(database_url, "SELECT id FROM credit_ledger") == []
        # Purging frees the space (the counter follows the row), and the hour's only
        # request is still there to take.
        await fetch(database_url, "DELETE FROM images WHERE storage_key = 'k/full'")
        events, err = await generate(server.grpc_port, spec)
        assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED


async def test_two_jobs_finishing_together_over_the_quota_store_exactly_one(
    tmp_path: Path, database_url: str, s3_endpoint: str, s3_bucket: str
) -> None:
    spec = common_pb2.GenerationSpec(prompt="a quota race", seed=11, size=SMALL)
    s3 = {"IMAGEGEN_S3_ENDPOINT": s3_endpoint, "IMAGEGEN_S3_BUCKET": s3_bucket}
    # The size of the image this spec renders (the same bytes every time), by a probe.
    async with serve_in_process(tmp_path / "probe", database_url, env=s3) as server:
        _events, err = await generate(server.grpc_port, spec)
        assert err is None
    [probe] = await fetch(database_url, "SELECT size_bytes, storage_key FROM images")
    size = int(probe["size_bytes"])

    gate = PutGate(s3_endpoint)
    async with gate.serve() as endpoint:
        env = {
            **plans(tmp_path, storage_bytes=size + size // 2),  # room for one image
            # The probe's data directory: the same C2PA signer, so the same marks' size.
            "IMAGEGEN_DATA_DIR": str(tmp_path / "probe" / "data"),
            "IMAGEGEN_S3_ENDPOINT": endpoint,
            "IMAGEGEN_S3_BUCKET": s3_bucket,
            "IMAGEGEN_WORKERS": "2",
        }
        async with serve_in_process(tmp_path / "race", database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
                submitted = [
                    await stub.SubmitGeneration(
                        E.SubmitGenerationRequest(spec=spec), metadata=metadata("bob")
                    )
                    for _ in range(2)
                ]
                # Both blobs are on their way before either image is recorded.
                await asyncio.wait_for(gate.wait_held(2), timeout=60)
                gate.gate.set()
                ends = await asyncio.gather(
                    *(last_events(stub, s.generation.name, "bob") for s in submitted)
                )
                balance = await usage_pb2_grpc.UsageServiceStub(channel).GetCreditBalance(
                    usage_pb2.GetCreditBalanceRequest(), metadata=metadata("bob")
                )
    outcomes = sorted((e[-1].type, e[-1].error.code) for e in ends)
    assert outcomes == [
        (E.GENERATION_EVENT_TYPE_COMPLETED, ""),
        (E.GENERATION_EVENT_TYPE_FAILED, "IMG_008"),
    ]
    stored = await fetch(database_url, "SELECT storage_key FROM images WHERE user_id = 'bob'")
    assert len(stored) == 1
    keys = set(await list_bucket_keys(s3_endpoint, s3_bucket))
    assert keys == {probe["storage_key"], stored[0]["storage_key"]}, "no orphan blob"
    [used] = await fetch(database_url, "SELECT used_bytes FROM storage_usage WHERE user_id = 'bob'")
    assert used["used_bytes"] == size
    # One image charged (1 credit at 256x256), the failed job's reservation refunded.
    assert (balance.balance.available_credits, balance.balance.reserved_credits) == (99, 0)


async def test_a_queued_job_of_a_user_who_filled_the_quota_makes_no_provider_call(
    tmp_path: Path, database_url: str, s3_endpoint: str, s3_bucket: str
) -> None:
    # Two jobs accepted while the quota is empty; the first fills it, and the second
    # is refused before its provider call (no PROGRESS from the provider).
    spec = common_pb2.GenerationSpec(prompt="a queued fox", seed=3, size=SMALL)
    s3 = {"IMAGEGEN_S3_ENDPOINT": s3_endpoint, "IMAGEGEN_S3_BUCKET": s3_bucket}
    async with serve_in_process(tmp_path / "probe", database_url, env=s3) as server:
        await generate(server.grpc_port, spec)
    [probe] = await fetch(database_url, "SELECT size_bytes FROM images")
    gate = PutGate(s3_endpoint)
    async with gate.serve() as endpoint:
        env = {
            **plans(tmp_path, storage_bytes=int(probe["size_bytes"])),
            # The probe's data directory: the same C2PA signer, so the same marks' size.
            "IMAGEGEN_DATA_DIR": str(tmp_path / "probe" / "data"),
            "IMAGEGEN_S3_ENDPOINT": endpoint,
            "IMAGEGEN_S3_BUCKET": s3_bucket,
            "IMAGEGEN_WORKERS": "1",
        }
        async with serve_in_process(tmp_path / "queued", database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
                first = await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(spec=spec), metadata=metadata("carol")
                )
                # The first job's image is held on its way to storage while the
                # second is accepted (the quota is still empty).
                await asyncio.wait_for(gate.wait_held(1), timeout=60)
                second = await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(spec=spec), metadata=metadata("carol")
                )
                gate.gate.set()
                ends = [
                    await last_events(stub, job.generation.name, "carol") for job in (first, second)
                ]
    assert ends[0][-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    assert ends[1][-1].type == E.GENERATION_EVENT_TYPE_FAILED
    assert ends[1][-1].error.code == "IMG_008"
    assert not any(e.type == E.GENERATION_EVENT_TYPE_PROGRESS for e in ends[1]), (
        "no provider progress: the call was never made"
    )
    assert gate.held == 1, "the second job never had an image to store"
