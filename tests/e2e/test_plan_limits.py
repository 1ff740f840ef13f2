"""Plan limits hold across replicas: requests per hour and concurrent generations."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2

from tests.e2e.test_jobs import submit, watch
from tests.served import start_server

pytestmark = pytest.mark.e2e
E = generation_pb2


def plans_file(tmp_path: Path, **free: int | None) -> str:
    limits = {
        "requests_per_hour": None,
        "requests_per_day": None,
        "concurrent": None,
        "monthly_credits": 1000,
        **free,
    }
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"plans": {"free": limits}}))
    return str(path)


def retry_delay(err: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(err)
    assert status is not None
    reason, delay = "", -1.0
    for detail in status.details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(retry):
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    assert reason == "IMG_005"
    return delay


def request(prompt: str) -> E.SubmitGenerationRequest:
    return E.SubmitGenerationRequest(
        spec=common_pb2.GenerationSpec(
            prompt=prompt, size=common_pb2.ImageSize(width=256, height=256)
        )
    )


async def test_eleventh_request_in_the_hour_is_refused_across_two_replicas(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_PLANS_FILE": plans_file(tmp_path, requests_per_hour=10)}
    a = await start_server(tmp_path, database_url, name="a", extra_env=env)
    b = await start_server(tmp_path, database_url, name="b", extra_env=env)
    try:
        accepted = await asyncio.gather(
            *(submit(a if i % 2 else b, request(f"p{i}")) for i in range(10))
        )
        assert len({g.name for g in accepted}) == 10
        for server in (a, b):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await submit(server, request("one too many"))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 0 < retry_delay(refused.value) <= 3600
        # Another user has their own count.
        await submit(a, request("bob's first"), user="bob")
        conn = await asyncpg.connect(database_url)
        try:
            count = await conn.fetchval("SELECT count(*) FROM generations WHERE user_id = 'alice'")
            refused_rows = await conn.fetchval(
                "SELECT count(*) FROM generations WHERE prompt = 'one too many'"
            )
        finally:
            await conn.close()
        assert (count, refused_rows) == (10, 0), "refused requests are neither queued nor charged"
    finally:
        a.kill()
        b.kill()


async def test_a_second_concurrent_generation_waits_for_the_first(
    tmp_path: Path, database_url: str
) -> None:
    env = {
        "IMAGEGEN_PLANS_FILE": plans_file(tmp_path, concurrent=1),
        "IMAGEGEN_LOCAL_STEP_DELAY": "0.3",
    }
    server = await start_server(tmp_path, database_url, extra_env=env)
    try:
        first = await submit(server, request("first"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await submit(server, request("second"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay(refused.value) > 0
        events = await watch(server, first.name)
        assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        later = await submit(server, request("second, later"))
        assert later.name != first.name
    finally:
        server.kill()
