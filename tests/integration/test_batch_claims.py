"""The two places where replicas race over a batch, against PostgreSQL itself: the claim
gate that keeps a user's batch jobs within their plan's concurrency (migrations/
0011_batches.sql), and the count of unfinished jobs that queues a batch's callback exactly
once (services/webhooks/outbox.py). Claims run on separate connections, as two replicas'
would; transactions are held open by hand where the test needs an order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from imagegen.domain.models import EventType, GenerationSpec, GenerationState, Size
from imagegen.repositories.batches import BatchRepository, NewBatch
from imagegen.repositories.db import open_pool
from imagegen.repositories.generations import GenerationRepository, NewEvent, NewGeneration
from imagegen.repositories.unit_of_work import PostgresDatabase
from imagegen.services.webhooks.outbox import queue_job_webhook

LEASE = timedelta(seconds=30)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_pool(database_url, min_size=1, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


async def make_batch(
    pool: asyncpg.Pool,
    jobs: int,
    *,
    max_concurrent: int | None,
    user: str = "alice",
    callback_uri: str = "",
) -> tuple[str, list[str]]:
    """A batch of `jobs` queued jobs, stored as BatchGenerate stores one."""
    batch_id = str(uuid.uuid4())
    job_ids = [str(uuid.uuid4()) for _ in range(jobs)]
    async with pool.acquire() as conn, conn.transaction():
        await BatchRepository(conn).insert(
            NewBatch(batch_id, user, "", {}, callback_uri, job_count=jobs)
        )
        for index, job_id in enumerate(job_ids):
            await GenerationRepository(conn).insert(
                NewGeneration(
                    id=job_id,
                    user_id=user,
                    sub_account="",
                    request_id="",
                    spec=GenerationSpec(prompt=f"job {index}", size=Size(256, 256)),
                    provider="local",
                    credits=1,
                    extra_spec={},
                )
            )
        await BatchRepository(conn).attach_jobs(batch_id, job_ids, max_concurrent=max_concurrent)
    return batch_id, job_ids


async def start(conn: asyncpg.Connection, job_ids: list[str]) -> int:
    """Turn queued jobs into running ones in one statement, as a claim does; how many did."""
    status = await conn.execute(
        "UPDATE generations SET state = 'running' WHERE id = ANY($1::uuid[])",
        [uuid.UUID(j) for j in job_ids],
    )
    return int(status.split()[-1])


async def running(pool: asyncpg.Pool, user: str = "alice") -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM generations WHERE user_id = $1 AND state = 'running'", user
        )
    )


async def blocked_on_a_lock(pool: asyncpg.Pool) -> None:
    """Return once some backend of this database waits for a lock (bounded)."""
    for _ in range(500):
        if await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no statement ever waited for a lock")


async def test_the_gate_counts_the_jobs_its_own_statement_started(pool: asyncpg.Pool) -> None:
    _, jobs = await make_batch(pool, 5, max_concurrent=2)
    async with pool.acquire() as conn:
        assert await start(conn, jobs) == 2
    assert await running(pool) == 2


async def test_the_gate_counts_every_job_of_the_user_and_no_one_elses(pool: asyncpg.Pool) -> None:
    _, alices = await make_batch(pool, 3, max_concurrent=2)
    _, bobs = await make_batch(pool, 3, max_concurrent=2, user="bob")
    _, singles = await make_batch(pool, 1, max_concurrent=None)
    async with pool.acquire() as conn:
        # A job without max_concurrent passes; it then counts against alice's batch jobs.
        assert await start(conn, singles) == 1
        assert await start(conn, alices) == 1
        assert await start(conn, bobs) == 2


async def test_a_claim_for_the_same_user_on_another_replica_waits_for_the_next_look(
    pool: asyncpg.Pool,
) -> None:
    _, jobs = await make_batch(pool, 3, max_concurrent=2)
    async with pool.acquire() as first, pool.acquire() as second:
        claiming = first.transaction()
        await claiming.start()
        assert await start(first, jobs[:1]) == 1
        # The first replica's claim holds the user's gate until it commits: the second
        # leaves the job queued at once instead of counting a stale number.
        assert await start(second, jobs[1:2]) == 0
        await claiming.commit()
        # Its next look counts the committed claim: one more fits, then none.
        assert await start(second, jobs[1:2]) == 1
        assert await start(second, jobs[2:]) == 0
    assert await running(pool) == 2


async def test_claims_from_many_replicas_at_once_never_pass_the_plans_concurrency(
    pool: asyncpg.Pool,
) -> None:
    await make_batch(pool, 12, max_concurrent=3)
    await make_batch(pool, 4, max_concurrent=None, user="bob")
    replicas = [GenerationRepository(pool) for _ in range(6)]
    started: set[str] = set()
    for _ in range(100):
        claimed = await asyncio.gather(
            *(r.claim(f"worker-{n}", LEASE, 3, max_attempts=3) for n, r in enumerate(replicas))
        )
        started.update(job.generation.id for claim in claimed for job in claim.jobs)
        assert await running(pool) <= 3
        if len(started) == 16:
            break
        # Two of alice's running jobs end; the next round may start two more.
        for job_id in await pool.fetch(
            "SELECT id FROM generations WHERE user_id = 'alice' AND state = 'running' LIMIT 2"
        ):
            assert await replicas[0].finish(
                str(job_id["id"]),
                state=GenerationState.COMPLETED,
                model="m",
                credits_per_image=1,
                terminal=NewEvent(EventType.COMPLETED, {"percent": 100}),
            )
    assert len(started) == 16


async def test_the_batch_callback_is_queued_once_when_its_last_two_jobs_end_together(
    pool: asyncpg.Pool,
) -> None:
    batch_id, jobs = await make_batch(
        pool, 3, max_concurrent=None, callback_uri="https://hooks.example.test/batch"
    )
    database = PostgresDatabase(pool)
    generations = GenerationRepository(pool)
    # The first job ends alone: the batch is not done.
    first = await generations.get_any(jobs[0])
    assert first is not None and first.batch_id == batch_id
    async with database.unit_of_work() as uow:
        await queue_job_webhook(uow, first, GenerationState.COMPLETED)
        await uow.commit()

    # The last two end at the same moment on two replicas: each unit of work counts its
    # job as ended before either commits.
    second, third = [await generations.get_any(j) for j in jobs[1:]]
    assert second is not None and third is not None
    one, other = database.unit_of_work(), database.unit_of_work()
    async with one as first_unit, other as second_unit:
        await queue_job_webhook(first_unit, second, GenerationState.FAILED)
        waiting = asyncio.create_task(
            queue_job_webhook(second_unit, third, GenerationState.COMPLETED)
        )
        await blocked_on_a_lock(pool)
        assert not waiting.done()
        await first_unit.commit()
        await waiting
        await second_unit.commit()

    queued = await pool.fetch("SELECT batch_id, event_type, url FROM webhook_deliveries")
    assert [tuple(r) for r in queued] == [
        (batch_id, "batch.completed", "https://hooks.example.test/batch")
    ]
    assert await pool.fetchval("SELECT unfinished_jobs FROM batches") == 0
