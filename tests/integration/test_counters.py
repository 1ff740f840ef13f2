"""The per-user counters of migrations/0003_counters.sql equal the rows they sum: the
credit balance row equals the ledger's sums by bucket, the storage counter the bytes of
the user's image rows, whatever writes them; the backfill builds them from rows that
existed before; the ledger stays append-only."""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from imagegen.domain.limits import counted_up_to
from imagegen.domain.plans import PlanLimits
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.generations import GenerationRepository
from imagegen.repositories.images import ImageRepository
from imagegen.repositories.migrator import apply_migrations, migrations_dir

INSERT_IMAGE = """
INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,
                    provider, prompt)
VALUES ($1, $2, $3, 'image/png', 8, 8, $4, 'local', 'p')
"""


async def storage_counters(conn: asyncpg.Connection) -> dict[str, int]:
    return {
        r["user_id"]: int(r["used_bytes"])
        for r in await conn.fetch("SELECT user_id, used_bytes FROM storage_usage")
    }


async def storage_sums(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT user_id, sum(size_bytes) AS used FROM images GROUP BY user_id")
    return {r["user_id"]: int(r["used"]) for r in rows}


async def balance_rows(conn: asyncpg.Connection) -> dict[str, tuple[int, int, object]]:
    rows = await conn.fetch(
        "SELECT user_id, allowance_credits, purchased_credits, allowance_period_start "
        "FROM credit_balances"
    )
    return {
        r["user_id"]: (
            int(r["allowance_credits"]),
            int(r["purchased_credits"]),
            r["allowance_period_start"],
        )
        for r in rows
    }


async def ledger_sums(conn: asyncpg.Connection) -> dict[str, tuple[int, int, object]]:
    rows = await conn.fetch(
        """
        SELECT user_id,
               coalesce(sum(amount) FILTER (WHERE bucket = 'allowance'), 0) AS allowance,
               coalesce(sum(amount) FILTER (WHERE bucket = 'purchased'), 0) AS purchased,
               max(period_start) FILTER (WHERE kind = 'allowance') AS period
          FROM credit_ledger GROUP BY user_id
        """
    )
    return {r["user_id"]: (int(r["allowance"]), int(r["purchased"]), r["period"]) for r in rows}


async def test_storage_counter_follows_every_insert_purge_and_change(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        ids = [uuid.uuid4() for _ in range(4)]
        for n, (image_id, user) in enumerate(zip(ids, ("alice", "alice", "bob", "alice"))):
            await conn.execute(INSERT_IMAGE, image_id, user, f"k/{n}", 100 * (n + 1))
        assert await storage_counters(conn) == {"alice": 100 + 200 + 400, "bob": 300}
        # A soft delete keeps counting (until purged); a metadata change does nothing.
        await conn.execute(
            "UPDATE images SET deleted_at = now(), title = 't' WHERE id = $1", ids[0]
        )
        assert await storage_counters(conn) == await storage_sums(conn)
        # A purge, a change of size and a change of owner move the counter.
        await conn.execute("DELETE FROM images WHERE id = $1", ids[0])
        await conn.execute("UPDATE images SET size_bytes = 250 WHERE id = $1", ids[1])
        await conn.execute("UPDATE images SET user_id = 'bob' WHERE id = $1", ids[3])
        assert await storage_counters(conn) == {"alice": 250, "bob": 700}
        assert await storage_counters(conn) == await storage_sums(conn)
        # A row inserted in a transaction that rolls back leaves the counter as it was.
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(INSERT_IMAGE, uuid.uuid4(), "alice", "k/new", 5)
                await conn.execute(INSERT_IMAGE, uuid.uuid4(), "alice", "k/new", 5)
        assert await storage_counters(conn) == {"alice": 250, "bob": 700}
        repository = ImageRepository(conn)
        assert await repository.storage_used("alice") == 250
        assert await repository.storage_used("nobody") == 0
        async with conn.transaction():
            assert await repository.lock_storage_used("carol") == 0
    finally:
        await conn.close()


async def test_balance_row_equals_the_ledger_sums_and_the_ledger_is_append_only(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        ledger = CreditLedger(conn)
        await ledger.grant("alice", 7)
        await ledger.grant("bob", 3)
        await conn.execute(
            "INSERT INTO credit_ledger (user_id, kind, bucket, amount, period_start) VALUES "
            "('alice', 'allowance', 'allowance', 50, '2026-10-01'), "
            "('alice', 'reserve', 'allowance', -4, NULL), "
            "('alice', 'expire', 'allowance', -46, '2026-11-01'), "
            "('alice', 'allowance', 'allowance', 50, '2026-11-01'), "
            "('alice', 'reserve', 'purchased', -2, NULL)"
        )
        assert await balance_rows(conn) == await ledger_sums(conn)
        facts = await ledger.facts("alice")
        assert (facts.allowance_left, facts.purchased_left) == (50, 5)
        assert facts.allowance_period is not None and facts.allowance_period.month == 11
        for statement in (
            "UPDATE credit_ledger SET amount = 1000 WHERE user_id = 'bob'",
            "DELETE FROM credit_ledger WHERE user_id = 'bob'",
        ):
            with pytest.raises(asyncpg.RestrictViolationError):
                await conn.execute(statement)
        assert await balance_rows(conn) == await ledger_sums(conn)
    finally:
        await conn.close()


async def test_the_migration_builds_the_counters_from_existing_rows(
    tmp_path: Path, empty_database_url: str
) -> None:
    older = tmp_path / "older"
    older.mkdir()
    for path in sorted(migrations_dir().glob("*.sql")):
        if path.name < "0003":
            shutil.copy(path, older / path.name)
    await apply_migrations(empty_database_url, directory=older)
    conn = await asyncpg.connect(empty_database_url)
    try:
        for n, (user, size) in enumerate((("alice", 10), ("alice", 32), ("bob", 5))):
            await conn.execute(INSERT_IMAGE, uuid.uuid4(), user, f"k/{n}", size)
        await conn.execute(
            "INSERT INTO credit_ledger (user_id, kind, bucket, amount, period_start) VALUES "
            "('alice', 'allowance', 'allowance', 50, '2026-11-01'), "
            "('alice', 'reserve', 'allowance', -3, NULL), "
            "('bob', 'grant', 'purchased', 9, NULL)"
        )
        await apply_migrations(empty_database_url)
        assert await storage_counters(conn) == {"alice": 42, "bob": 5}
        assert await balance_rows(conn) == await ledger_sums(conn)
        assert (await balance_rows(conn))["alice"][:2] == (47, 0)
        # And from there on the triggers keep them.
        await conn.execute(INSERT_IMAGE, uuid.uuid4(), "bob", "k/late", 1)
        assert await storage_counters(conn) == {"alice": 42, "bob": 6}
    finally:
        await conn.close()


async def test_request_counts_stop_at_each_cap_and_name_the_request_that_frees_a_slot(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        base = await conn.fetchval("SELECT now()")
        # 2,000 jobs two days ago; 30 in the last half hour, a minute apart, 3 of them
        # still running; and one of someone else's.
        await conn.execute(
            """
            INSERT INTO generations (id, user_id, fingerprint, prompt, width, height,
                                     image_count, output_format, spec, provider, state,
                                     created_at)
            SELECT gen_random_uuid(), 'alice', '{}'::jsonb, 'p', 1, 1, 1, 'png', '{}'::jsonb,
                   'local',
                   CASE WHEN n <= 3 THEN 'running' ELSE 'completed' END,
                   CASE WHEN n <= 30 THEN $1::timestamptz - make_interval(mins => n)
                        ELSE $1::timestamptz - make_interval(days => 2, mins => n) END
              FROM generate_series(1, 2030) AS n
            UNION ALL
            SELECT gen_random_uuid(), 'bob', '{}'::jsonb, 'p', 1, 1, 1, 'png', '{}'::jsonb,
                   'local',
                   'queued', $1::timestamptz
            """,
            base,
        )
        repository = GenerationRepository(conn)
        counts = await repository.request_counts("alice", counted_up_to(PlanLimits(10, 50, 2)))
        assert (counts.last_hour, counts.last_day, counts.active) == (10, 30, 2)
        # The 10th newest of the hour is 10 minutes old: it leaves the window in 50.
        assert counts.oldest_in_hour is not None
        assert base - counts.oldest_in_hour == timedelta(minutes=10)
        assert counts.oldest_in_day is not None
        assert base - counts.oldest_in_day == timedelta(minutes=30)
        unlimited = await repository.request_counts(
            "alice", counted_up_to(PlanLimits(None, None, None))
        )
        assert (unlimited.last_hour, unlimited.last_day, unlimited.active) == (0, 0, 0)
        roomy = await repository.request_counts("alice", counted_up_to(PlanLimits(100, 100, 9)))
        assert (roomy.last_hour, roomy.last_day, roomy.active) == (30, 30, 3)
    finally:
        await conn.close()
