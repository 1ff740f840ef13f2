"""A provider that is not configured is refused at submit (IMG_001, FAILED_PRECONDITION)
when no configured fallback can take the request: no job, no rate-limit slot, no
charge, no provider call. With a fallback that can, the request is accepted and served."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc, usage_pb2, usage_pb2_grpc

from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, generate, metadata, reason_of

E = generation_pb2
SMALL = common_pb2.ImageSize(width=256, height=256)


def one_request_an_hour(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "plans.json"
    path.write_text(
        json.dumps(
            {
                "plans": {
                    "free": {
                        "requests_per_hour": 1,
                        "requests_per_day": None,
                        "concurrent": None,
                        "monthly_credits": 10,
                    }
                }
            }
        )
    )
    return {"IMAGEGEN_PLANS_FILE": str(path)}


async def counts(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        jobs = await conn.fetchval("SELECT count(*) FROM generations")
        ledger = await conn.fetchval("SELECT count(*) FROM credit_ledger")
    finally:
        await conn.close()
    return int(jobs), int(ledger)


async def test_forge_without_configuration_is_refused_at_submit_with_nothing_taken(
    tmp_path: Path, database_url: str
) -> None:
    # No BUILT_IN_FORGE_* at all, and no fallback chain.
    async with serve_in_process(tmp_path, database_url, env=one_request_an_hour(tmp_path)) as srv:
        forge = common_pb2.GenerationSpec(prompt="a fox", provider="forge", size=SMALL)
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{srv.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
            for call in (
                stub.SubmitGeneration(E.SubmitGenerationRequest(spec=forge), metadata=metadata()),
                stub.QuoteGeneration(E.QuoteGenerationRequest(spec=forge), metadata=metadata()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert reason_of(refused.value) == "IMG_001"
                assert "forge" in (refused.value.details() or "")
            events, err = await generate(srv.grpc_port, forge)
            assert events == [], "refused before a job exists: no QUEUED event"
            assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(err) == "IMG_001"
            assert await counts(database_url) == (0, 0), "no job, no charge"
            balance = await usage_pb2_grpc.UsageServiceStub(channel).GetCreditBalance(
                usage_pb2.GetCreditBalanceRequest(), metadata=metadata()
            )
            assert balance.balance.available_credits == 10
            # The hour's one request is still free: no rate-limit slot was taken.
            local = common_pb2.GenerationSpec(prompt="a fox", provider="local", size=SMALL)
            accepted = await stub.SubmitGeneration(
                E.SubmitGenerationRequest(spec=local), metadata=metadata()
            )
            assert accepted.generation.provider == "local"
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(spec=local), metadata=metadata()
                )
            assert reason_of(limited.value) == "IMG_005", "the slot that counted was local's"


async def test_a_configured_fallback_takes_a_request_for_an_unconfigured_provider(
    tmp_path: Path, database_url: str
) -> None:
    env = {**one_request_an_hour(tmp_path), "IMAGEGEN_FALLBACK_PROVIDERS": "forge,local"}
    async with serve_in_process(tmp_path, database_url, env=env) as srv:
        events, err = await generate(
            srv.grpc_port, common_pb2.GenerationSpec(prompt="a fox", provider="forge", size=SMALL)
        )
    assert err is None
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    conn = await asyncpg.connect(database_url)
    try:
        served = await conn.fetch("SELECT provider, state FROM generations")
    finally:
        await conn.close()
    assert [tuple(r) for r in served] == [("local", "completed")], "the fallback served it"


async def test_a_fallback_that_cannot_do_the_request_does_not_count(
    tmp_path: Path, database_url: str
) -> None:
    # `local` is the only fallback, and it does not have forge's model.
    env = {"IMAGEGEN_FALLBACK_PROVIDERS": "local"}
    async with serve_in_process(tmp_path, database_url, env=env) as srv:
        events, err = await generate(
            srv.grpc_port,
            common_pb2.GenerationSpec(
                prompt="a fox", provider="forge", size=SMALL, model="forge-image"
            ),
        )
    assert events == []
    assert err is not None and reason_of(err) == "IMG_001"
    assert await counts(database_url) == (0, 0)
