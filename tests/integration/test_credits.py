"""The credits ledger: reserve at submit, settle once at the end, refunds, the monthly
allowance, grants, and a balance that never goes negative under concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc, usage_pb2, usage_pb2_grpc

from imagegen.domain.credits import Balance, balance_of, plan_reservation
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.db import open_pool
from tests.fakes.forge_server import ForgeFake, Reply
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, generate, metadata, reason_of

E = generation_pb2
SMALL = common_pb2.ImageSize(width=512, height=512)


def plans(tmp_path: Path, monthly_credits: int) -> dict[str, str]:
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"plans": {"free": {"monthly_credits": monthly_credits}}}))
    return {"IMAGEGEN_PLANS_FILE": str(path)}


async def ledger_sum(dsn: str, user: str = "alice") -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM credit_ledger WHERE user_id = $1", user
            )
        )
    finally:
        await conn.close()


async def balance(port: int, user: str = "alice") -> usage_pb2.CreditBalance:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
        reply = await usage_pb2_grpc.UsageServiceStub(ch).GetCreditBalance(
            usage_pb2.GetCreditBalanceRequest(), metadata=metadata(user)
        )
        return reply.balance


async def test_fifty_concurrent_submits_with_credits_for_ten(tmp_path: Path, database_url: str):
    async with serve_in_process(tmp_path, database_url, env=plans(tmp_path, 10)) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as ch:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(ch)

            async def one(i: int) -> str:
                try:
                    await stub.SubmitGeneration(
                        E.SubmitGenerationRequest(
                            spec=common_pb2.GenerationSpec(prompt=f"p{i}", size=SMALL)
                        ),
                        metadata=metadata(),
                    )
                except grpc.aio.AioRpcError as err:
                    return reason_of(err)
                return "accepted"

            outcomes = await asyncio.gather(*(one(i) for i in range(50)))
        assert outcomes.count("accepted") == 10
        assert outcomes.count("IMG_006") == 40
        conn = await asyncpg.connect(database_url)
        try:
            jobs = await conn.fetchval("SELECT count(*) FROM generations")
            for _ in range(300):
                running = await conn.fetchval(
                    "SELECT count(*) FROM generations WHERE state IN ('queued', 'running')"
                )
                if running == 0:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert jobs == 10, "refused requests were not queued"
        after = await balance(server.grpc_port)
    assert await ledger_sum(database_url) == after.available_credits == 0
    assert after.reserved_credits == 0


async def test_failed_and_cancelled_jobs_are_refunded_and_quotes_match(
    tmp_path: Path, database_url: str
) -> None:
    async with (
        ForgeFake.start() as forge,
        serve_in_process(
            tmp_path,
            database_url,
            env={
                **plans(tmp_path, 20),
                "BUILT_IN_FORGE_API_URL": forge.url,
                "BUILT_IN_FORGE_API_KEY": "k",
                "IMAGEGEN_DEFAULT_PROVIDER": "local",
            },
        ) as server,
    ):
        forge.default = Reply(status=400)  # every forge job fails, not retried
        port = server.grpc_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(ch)
            spec = common_pb2.GenerationSpec(prompt="a fox", count=2)  # 1024x1024: 2 each
            quote = await stub.QuoteGeneration(
                E.QuoteGenerationRequest(spec=spec), metadata=metadata()
            )
            assert quote.credits == 4
            _events, err = await generate(port, spec)
            assert err is None
            assert (await balance(port)).available_credits == 20 - quote.credits

            # A failed job (the provider rejects it) gives its reservation back.
            failed, _ = await generate(
                port, common_pb2.GenerationSpec(prompt="x", provider="forge")
            )
            assert failed[-1].error.code == "IMG_002"
            assert (await balance(port)).available_credits == 16

        conn = await asyncpg.connect(database_url)
        try:
            charged = await conn.fetchval(
                "SELECT credits FROM generations WHERE state = 'completed'"
            )
        finally:
            await conn.close()
        assert charged == quote.credits
    # A cancelled job gives back what was not delivered (one worker, busy with a slow job).
    env = {**plans(tmp_path, 20), "IMAGEGEN_WORKERS": "1", "IMAGEGEN_LOCAL_STEP_DELAY": "0.5"}
    async with serve_in_process(tmp_path / "second", database_url, env=env) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as ch:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(ch)
            slow = await stub.SubmitGeneration(
                E.SubmitGenerationRequest(
                    spec=common_pb2.GenerationSpec(prompt="slow", size=SMALL)
                ),
                metadata=metadata(),
            )
            queued = await stub.SubmitGeneration(
                E.SubmitGenerationRequest(
                    spec=common_pb2.GenerationSpec(prompt="wait", size=SMALL)
                ),
                metadata=metadata(),
            )
            before = (await balance(server.grpc_port)).available_credits
            await stub.CancelGeneration(
                E.CancelGenerationRequest(name=queued.generation.name), metadata=metadata()
            )
            assert (await balance(server.grpc_port)).available_credits == before + 1
            await stub.CancelGeneration(
                E.CancelGenerationRequest(name=slow.generation.name), metadata=metadata()
            )
            async for _ in stub.WatchGeneration(
                E.WatchGenerationRequest(name=slow.generation.name), metadata=metadata()
            ):
                pass
            assert (await balance(server.grpc_port)).available_credits == before + 2
    assert await ledger_sum(database_url) == 16


async def test_monthly_allowance_resets_and_grants_do_not_expire(
    tmp_path: Path, database_url: str
) -> None:
    pool = await open_pool(database_url, max_size=2)
    ledger = CreditLedger(pool)
    january = datetime(2026, 1, 15, tzinfo=UTC)
    february = datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC)

    async def balance_at(now: datetime) -> Balance:
        facts, held = await ledger.balance_facts("alice")
        return balance_of(facts, held, 10, now)

    try:
        async with pool.acquire() as conn, conn.transaction():
            await CreditLedger(conn).open_period("alice", 10, january)
            await CreditLedger(conn).open_period("alice", 10, january)  # once per period
        assert (await balance_at(january)).available == 10
        assert await ledger.grant("alice", 5) == 15
        conn = await pool.acquire()
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO generations (id, user_id, fingerprint, prompt, width, height, "
                    "image_count, output_format, spec, provider, state) VALUES "
                    "('00000000-0000-0000-0000-000000000001', 'alice', '{}', 'p', 1, 1, 1, 'png',"
                    " '{}', 'local', 'completed')"
                )
                in_transaction = CreditLedger(conn)
                facts = await in_transaction.open_period("alice", 10, january)
                await in_transaction.reserve(
                    "alice",
                    "00000000-0000-0000-0000-000000000001",
                    plan_reservation(facts, 3, january),
                )
                await in_transaction.settle(
                    "alice",
                    "00000000-0000-0000-0000-000000000001",
                    3,
                    allowance=10,
                    now=january,
                )
            jan = await balance_at(january)
            assert (jan.allowance_remaining, jan.purchased, jan.available) == (7, 5, 12)
            # February, before anything is written: shown as the opening will make it.
            shown = await balance_at(february)
            assert (shown.allowance_remaining, shown.purchased, shown.available) == (10, 5, 15)
            async with conn.transaction():
                await CreditLedger(conn).open_period("alice", 10, february)
        finally:
            await pool.release(conn)
        feb = await balance_at(february)
        assert (feb.allowance_remaining, feb.purchased, feb.available) == (10, 5, 15)
        assert feb == shown
        assert feb.period_reset == datetime(2026, 3, 1, tzinfo=UTC)
    finally:
        await pool.close()
    assert await ledger_sum(database_url) == 15


async def test_admin_grant_from_the_cli_raises_the_balance(tmp_path: Path, database_url: str):
    env = {**os.environ, "DATABASE_URL": database_url, "IMAGEGEN_DATA_DIR": str(tmp_path)}
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "imagegen.cli",
            "credits",
            "grant",
            "--user",
            "carol",
            "--amount",
            "25",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "balance 25" in done.stdout
    assert await ledger_sum(database_url, "carol") == 25
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "imagegen.cli",
                "credits",
                "grant",
                "--user",
                "c",
                "--amount",
                "0",
            ],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )
