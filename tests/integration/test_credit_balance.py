"""Every field of CreditBalance as its comment in proto/imagegen/v1/usage.proto says:
for a new user before any submit, during a reservation, after settlement, after a
refund, and across a period rollover."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc, usage_pb2, usage_pb2_grpc

from imagegen.domain.credits import Balance, balance_of, next_period, period_start, plan_reservation
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.db import open_pool
from tests.fakes.forge_server import ForgeFake, Reply
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, generate, metadata

E = generation_pb2
MONTHLY = 20


def check_fields(balance: usage_pb2.CreditBalance, expected: dict[str, int]) -> None:
    """The numbers asked for, and what holds for every balance."""
    got = {name: getattr(balance, name) for name in expected}
    assert got == expected
    assert balance.available_credits == (
        balance.allowance_remaining_credits + balance.purchased_credits - balance.reserved_credits
    ), "available = allowance remaining + purchased - reserved"
    assert balance.monthly_allowance_credits == MONTHLY
    assert balance.plan == "free"
    start = period_start(datetime.now(UTC))
    assert balance.period_start_time.ToDatetime(tzinfo=UTC) == start
    assert balance.period_reset_time.ToDatetime(tzinfo=UTC) == next_period(start)


async def ledger_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM credit_ledger"))
    finally:
        await conn.close()


async def test_balance_fields_from_a_new_user_through_a_reservation_settlement_and_refund(
    tmp_path: Path, database_url: str
) -> None:
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"plans": {"free": {"monthly_credits": MONTHLY}}}))
    async with ForgeFake.start() as forge:
        forge.default = Reply(delay=60)  # a forge job runs until it is cancelled
        env = {
            "IMAGEGEN_PLANS_FILE": str(plans),
            "BUILT_IN_FORGE_API_URL": forge.url,
            "BUILT_IN_FORGE_API_KEY": "k",
            "IMAGEGEN_DEFAULT_PROVIDER": "local",
        }
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                usage = usage_pb2_grpc.UsageServiceStub(channel)
                jobs = generation_pb2_grpc.ImageGenerationServiceStub(channel)

                async def balance() -> usage_pb2.CreditBalance:
                    reply = await usage.GetCreditBalance(
                        usage_pb2.GetCreditBalanceRequest(), metadata=metadata()
                    )
                    return reply.balance

                # A new user: the month's allowance, before any submit; reading it
                # writes nothing.
                check_fields(
                    await balance(),
                    {
                        "available_credits": MONTHLY,
                        "allowance_remaining_credits": MONTHLY,
                        "purchased_credits": 0,
                        "reserved_credits": 0,
                    },
                )
                assert await ledger_rows(database_url) == 0

                # After settlement: a 256x256 image charged 1 credit.
                small = common_pb2.GenerationSpec(
                    prompt="a fox", size=common_pb2.ImageSize(width=256, height=256)
                )
                events, err = await generate(server.grpc_port, small)
                assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
                check_fields(
                    await balance(),
                    {
                        "available_credits": MONTHLY - 1,
                        "allowance_remaining_credits": MONTHLY - 1,
                        "purchased_credits": 0,
                        "reserved_credits": 0,
                    },
                )
                pool = await open_pool(database_url, max_size=1)
                try:
                    await CreditLedger(pool).grant("alice", 5)
                finally:
                    await pool.close()

                # During a reservation: a 1024x1024 forge job (2 credits) that runs.
                running = await jobs.SubmitGeneration(
                    E.SubmitGenerationRequest(
                        spec=common_pb2.GenerationSpec(prompt="a slow fox", provider="forge")
                    ),
                    metadata=metadata(),
                )
                await forge.requests.wait_for(1)
                check_fields(
                    await balance(),
                    {
                        "available_credits": MONTHLY - 1 + 5 - 2,
                        "allowance_remaining_credits": MONTHLY - 1,
                        "purchased_credits": 5,
                        "reserved_credits": 2,
                    },
                )

                # After a refund: the job is cancelled, its reservation comes back.
                await jobs.CancelGeneration(
                    E.CancelGenerationRequest(name=running.generation.name), metadata=metadata()
                )
                async for _ in jobs.WatchGeneration(
                    E.WatchGenerationRequest(name=running.generation.name), metadata=metadata()
                ):
                    pass
                check_fields(
                    await balance(),
                    {
                        "available_credits": MONTHLY - 1 + 5,
                        "allowance_remaining_credits": MONTHLY - 1,
                        "purchased_credits": 5,
                        "reserved_credits": 0,
                    },
                )


async def test_a_rollover_shows_the_new_allowance_and_a_late_refund_lands_in_it(
    database_url: str,
) -> None:
    january = datetime(2026, 1, 20, tzinfo=UTC)
    february = datetime(2026, 2, 3, tzinfo=UTC)
    job = "00000000-0000-0000-0000-0000000000aa"
    pool = await open_pool(database_url, max_size=2)
    ledger = CreditLedger(pool)

    async def shown(now: datetime) -> Balance:
        facts, held = await ledger.balance_facts("alice")
        return balance_of(facts, held, MONTHLY, now)

    def numbers(balance: Balance) -> tuple[int, int, int, int]:
        assert balance.available == (
            balance.allowance_remaining + balance.purchased - balance.reserved
        )
        return (
            balance.available,
            balance.allowance_remaining,
            balance.purchased,
            balance.reserved,
        )

    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO generations (id, user_id, fingerprint, prompt, width, height, "
                "image_count, output_format, spec, provider, state) VALUES "
                "($1, 'alice', '{}', 'p', 1, 1, 1, 'png', '{}', 'local', 'running')",
                job,
            )
            in_january = CreditLedger(conn)
            facts = await in_january.open_period("alice", MONTHLY, january)
            await in_january.reserve("alice", job, plan_reservation(facts, 3, january))
        assert numbers(await shown(january)) == (17, 20, 0, 3)

        # February, nothing written yet: January's 17 left expire, February's 20 are
        # shown, and the 3 still held will come back into February.
        assert numbers(await shown(february)) == (20, 23, 0, 3)
        assert (await shown(february)).period_start == datetime(2026, 2, 1, tzinfo=UTC)

        # The job fails in February: its refund opens February first, then lands in it.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE generations SET state = 'failed' WHERE id = $1", job)
            await CreditLedger(conn).settle("alice", job, 0, allowance=MONTHLY, now=february)
        assert numbers(await shown(february)) == (23, 23, 0, 0)
        # Opening February again (the next submit) changes nothing.
        async with pool.acquire() as conn, conn.transaction():
            after = await CreditLedger(conn).open_period("alice", MONTHLY, february)
        assert after.allowance_left == 23
        kinds = [
            (r["kind"], r["amount"])
            for r in await pool.fetch(
                "SELECT kind, amount FROM credit_ledger WHERE user_id = 'alice' ORDER BY id"
            )
        ]
        assert kinds == [
            ("allowance", 20),
            ("reserve", -3),
            ("expire", -17),
            ("allowance", 20),
            ("refund", 3),
        ]
    finally:
        await pool.close()
