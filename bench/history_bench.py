"""Benchmark: does a user's history make their requests slower? (issue 10 item 5)

1. Generations: three users with 0, 5,000 and 60,000 past generations (each with its
   image row and credit reservation, seeded with plain SQL, all older than a day), on
   a plan whose limits, credits and storage quota are all set (so every check runs).
   Against one served process (`imagegen serve`, embedded PostgreSQL, local blobs, a
   Forge-wire fake answering at once with a 256x256 PNG): SubmitGeneration latency
   (sequential) and gen/s (GenerateImage streams, N concurrent), the levels
   interleaved over several rounds; ratios against the user with no history.
2. The production statements of those checks (the plan-limit counts, the credit
   balance row and its period opening, the held credits of GetCreditBalance, the
   storage counter), recorded from the repositories and EXPLAIN ANALYZEd for each
   user, next to the statements they replaced (from main 842de95) in the same run.
3. ListImages with a word no image holds, a rare word and a common one, for users
   with 1,000 and 100,000 images: served p50/p99 and the bare statement, new and old.

Prints figures; asserts nothing.

    .venv/bin/python bench/history_bench.py [--rounds 3] [--per-round 48] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from harness import start_forge_fake
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from PIL import Image

from imagegen.domain.limits import counted_up_to
from imagegen.domain.plans import PlanLimits
from imagegen.embedded import start_embedded_postgres
from imagegen.identity import mint_token
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.generations import GenerationRepository
from imagegen.repositories.images import LIST_IMAGES_SQL, ImageRepository, page_statement
from imagegen.repositories.migrator import apply_migrations

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
FORGE_KEY = "bench-forge-key"
HISTORIES = {"h0": 0, "h5k": 5_000, "h60k": 60_000}
LIBRARIES = {"lib1k": 1_000, "lib100k": 100_000}
WORDS = ["fox", "lighthouse", "cat", "forest", "harbour", "mountain", "river", "city", "owl"]
#: The plan every benchmark user is on: every cap set, none reached.
PLAN = {
    "requests_per_hour": 100_000,
    "requests_per_day": 100_000,
    "concurrent": 64,
    "storage_bytes": 10**13,
    "monthly_credits": 10**9,
}

#: The statements the new ones replaced, as they were on main 842de95.
BEFORE = {
    "limit counts": (
        """
        SELECT now() AS now,
               count(*) FILTER (WHERE created_at > now() - interval '1 hour') AS hour,
               count(*) FILTER (WHERE created_at > now() - interval '1 day') AS day,
               count(*) FILTER (WHERE state IN ('queued', 'running')) AS running,
               min(created_at) FILTER (WHERE created_at > now() - interval '1 hour')
                   AS oldest_in_hour,
               min(created_at) FILTER (WHERE created_at > now() - interval '1 day')
                   AS oldest_in_day
          FROM generations
         WHERE user_id = $1
           AND (created_at > now() - interval '1 day' OR state IN ('queued', 'running'))
        """
    ),
    "credit facts": (
        "SELECT bucket, coalesce(sum(amount), 0) AS left, "
        "bool_or(kind = 'allowance' AND period_start = $2) AS current "
        "FROM credit_ledger WHERE user_id = $1 GROUP BY bucket"
    ),
    "balance": (
        """
        SELECT coalesce(sum(amount), 0) AS available,
               coalesce(sum(amount) FILTER (WHERE bucket = 'allowance'), 0) AS allowance,
               coalesce(sum(amount) FILTER (WHERE bucket = 'purchased'), 0) AS purchased,
               coalesce(-sum(amount) FILTER (
                   WHERE kind IN ('reserve', 'refund') AND generation_id IN (
                       SELECT id FROM generations
                        WHERE user_id = $1 AND state IN ('queued', 'running'))), 0)
                   AS reserved
          FROM credit_ledger WHERE user_id = $1
        """
    ),
    "storage used": "SELECT coalesce(sum(size_bytes), 0) FROM images WHERE user_id = $1",
}


def png(size: int = 256) -> bytes:
    image = Image.new("RGB", (size, size))
    for y in range(0, size, 4):
        for x in range(0, size, 4):
            image.putpixel((x, y), ((x * 7) % 256, (y * 3) % 256, (x + y) % 256))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def seed_history(conn: asyncpg.Connection, user: str, count: int) -> None:
    """`count` finished generations of `user`, a minute apart and all older than a day,
    each with its image row and its credit reservation, as the service writes them."""
    if not count:
        return
    await conn.execute(
        """
        WITH past AS (
            INSERT INTO generations (id, user_id, fingerprint, prompt, width, height,
                                     image_count, output_format, spec, provider, state,
                                     credits, last_sequence, created_at, completed_at)
            SELECT gen_random_uuid(), $1, '{}'::jsonb, 'past ' || n, 256, 256, 1, 'png',
                   '{}'::jsonb, 'forge', 'completed', 1, 1,
                   now() - interval '2 days' - make_interval(mins => n),
                   now() - interval '2 days' - make_interval(mins => n)
              FROM generate_series(1, $2) AS n
            RETURNING id, created_at
        ), stored AS (
            INSERT INTO images (id, user_id, generation_id, storage_key, mime_type, width,
                                height, size_bytes, provider, prompt, created_at)
            SELECT gen_random_uuid(), $1, id, 'past/' || $1 || '/' || id, 'image/png', 256,
                   256, 50000, 'forge', 'past', created_at
              FROM past
        )
        INSERT INTO credit_ledger (user_id, kind, bucket, amount, generation_id, created_at)
        SELECT $1, 'reserve', 'allowance', -1, id, created_at FROM past
        """,
        user,
        count,
    )


async def seed_library(conn: asyncpg.Connection, user: str, count: int) -> None:
    """`count` images of `user` whose prompts use a few common words; three of the
    oldest also hold the rare word `zebra`; none holds `unicorn`."""
    await conn.execute(
        """
        INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,
                            provider, prompt, created_at)
        SELECT gen_random_uuid(), $1, 'lib/' || $1 || '/' || n, 'image/png', 1024, 1024,
               200000, 'local',
               'a ' || ($3::text[])[1 + n % 9] || CASE WHEN n > $2 - 3 THEN ' and a zebra'
                                                     ELSE '' END || ' at dawn',
               now() - make_interval(secs => n)
          FROM generate_series(1, $2) AS n
        """,
        user,
        count,
        WORDS,
    )


class Recorder:
    """An executor that records the statements a repository sends, then runs them."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    async def fetchrow(self, query: str, *args: Any) -> Any:
        self.statements.append((query, args))
        return await self._conn.fetchrow(query, *args)

    async def fetch(self, query: str, *args: Any) -> Any:
        self.statements.append((query, args))
        return await self._conn.fetch(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.statements.append((query, args))
        return await self._conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> Any:
        self.statements.append((query, args))
        return await self._conn.execute(query, *args)


async def production_statements(
    conn: asyncpg.Connection, user: str
) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """The statements submit, GetCreditBalance and the quota send for `user`, recorded
    from the repositories themselves (inside a transaction that is rolled back)."""
    now = datetime.now(UTC)
    limits = PlanLimits(
        PLAN["requests_per_hour"],
        PLAN["requests_per_day"],
        PLAN["concurrent"],
        PLAN["storage_bytes"],
    )
    found: dict[str, tuple[str, tuple[Any, ...]]] = {}
    calls: dict[str, Callable[[Recorder], Awaitable[object]]] = {
        "limit counts": lambda r: GenerationRepository(r).request_counts(
            user, counted_up_to(limits)
        ),
        "credit facts": lambda r: CreditLedger(r).open_period(user, PLAN["monthly_credits"], now),
        "balance": lambda r: CreditLedger(r).balance_facts(user),
        "storage used": lambda r: ImageRepository(r).storage_used(user),
    }
    transaction = conn.transaction()
    await transaction.start()
    try:
        for name, call in calls.items():
            recorder = Recorder(conn)
            await call(recorder)
            found[name] = recorder.statements[0]
    finally:
        # Leave nothing behind: the period's opening may have appended ledger rows.
        await transaction.rollback()
    return found


async def explain(
    conn: asyncpg.Connection, query: str, args: tuple[Any, ...]
) -> tuple[float, list[str]]:
    """EXPLAIN ANALYZE of one statement (in a transaction rolled back): its execution
    time in ms and its plan."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + query, *args)
    finally:
        await transaction.rollback()
    lines = [r[0] for r in rows]
    took = next(
        (
            float(line.split(":")[1].split()[0])
            for line in lines
            if line.startswith("Execution Time")
        ),
        float("nan"),
    )
    return took, lines


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def wait_idle(conn: asyncpg.Connection) -> None:
    """Until no job is queued or running."""
    while await conn.fetchval(
        "SELECT count(*) FROM generations WHERE state IN ('queued', 'running')"
    ):
        await asyncio.sleep(0.05)


async def timed(
    calls: int, concurrency: int, once: Callable[[], Awaitable[None]]
) -> tuple[float, list[float]]:
    """Run `once` `calls` times, `concurrency` at a time: (wall seconds, latencies)."""
    latencies: list[float] = []
    left = list(range(calls))

    async def worker() -> None:
        while left:
            left.pop()
            began = time.perf_counter()
            await once()
            latencies.append(time.perf_counter() - began)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=48, help="generations per level per round")
    parser.add_argument("--submits", type=int, default=30, help="submits per level per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pages", type=int, default=50, help="ListImages calls per case")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="seed this fraction of the rows (a smoke run)"
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="imagegen-histbench-"))
    tmp.chmod(0o755)
    embedded = await start_embedded_postgres(tmp / "pg")
    dsn = embedded.dsn
    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    for user, count in HISTORIES.items():
        await seed_history(conn, user, int(count * args.scale))
    for user, count in LIBRARIES.items():
        await seed_library(conn, user, int(count * args.scale))
    await conn.execute("ANALYZE")
    print(
        f"seeded {int(sum(HISTORIES.values()) * args.scale)} generations and "
        f"{int(sum(LIBRARIES.values()) * args.scale)} library images "
        f"in {time.perf_counter() - started:.0f}s"
    )

    forge_runner, forge_url = await start_forge_fake(png())
    plans = tmp / "plans.json"
    plans.write_text(json.dumps({"plans": {"free": PLAN}}))
    ready = tmp / "ready"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGEN_", "OTEL_"))},
        "IMAGEGEN_DATA_DIR": str(tmp / "served"),
        "IMAGEGEN_GRPC_PORT": "0",
        "IMAGEGEN_HTTP_PORT": "0",
        "IMAGEGEN_READY_FILE": str(ready),
        "IMAGEGEN_JWT_KEY": JWT_KEY,
        "IMAGEGEN_WORKERS": "8",
        "IMAGEGEN_LOG_LEVEL": "WARNING",
        "IMAGEGEN_PLANS_FILE": str(plans),
        "DATABASE_URL": dsn,
        "BUILT_IN_FORGE_API_URL": forge_url,
        "BUILT_IN_FORGE_API_KEY": FORGE_KEY,
    }
    (tmp / "served").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "served.log", "wb"),
    )
    while not ready.exists() or not ready.read_text().strip():
        if process.poll() is not None:
            raise SystemExit((tmp / "served.log").read_text())
        await asyncio.sleep(0.05)
    address = dict(p.split("=", 1) for p in ready.read_text().split()[2:])["grpc"]
    channel = grpc.aio.insecure_channel(address, options=(("grpc.enable_http_proxy", 0),))
    jobs = generation_pb2_grpc.ImageGenerationServiceStub(channel)
    library = library_pb2_grpc.ImageLibraryServiceStub(channel)
    usage = usage_pb2_grpc.UsageServiceStub(channel)

    def metadata(user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(JWT_KEY, user_id=user, plan='free')}"),)

    spec = common_pb2.GenerationSpec(
        prompt="bench", provider="forge", size=common_pb2.ImageSize(width=256, height=256)
    )

    # --- 1. generations by history --------------------------------------------------
    rates: dict[str, list[float]] = {user: [] for user in HISTORIES}
    submit_latencies: dict[str, list[float]] = {user: [] for user in HISTORIES}
    # Round 0 warms the server up (connections, caches) and is not counted.
    for round_number in range(args.rounds + 1):
        for user in HISTORIES:
            md = metadata(user)

            async def generate_once(md: tuple[tuple[str, str], ...] = md) -> None:
                async for reply in jobs.GenerateImage(
                    generation_pb2.GenerateImageRequest(spec=spec), metadata=md, timeout=120
                ):
                    if reply.event.type == generation_pb2.GENERATION_EVENT_TYPE_FAILED:
                        raise SystemExit(f"generation failed: {reply.event.error}")

            async def submit_once(md: tuple[tuple[str, str], ...] = md) -> None:
                await jobs.SubmitGeneration(
                    generation_pb2.SubmitGenerationRequest(spec=spec), metadata=md, timeout=60
                )

            wall, _ = await timed(args.per_round, args.concurrency, generate_once)
            _, latencies = await timed(args.submits, 1, submit_once)
            await wait_idle(conn)
            if round_number:
                rates[user].append(args.per_round / wall)
                submit_latencies[user] += latencies
    balances = {}
    for user in HISTORIES:
        reply = await usage.GetCreditBalance(
            usage_pb2.GetCreditBalanceRequest(), metadata=metadata(user)
        )
        balances[user] = reply.balance

    # --- 3. ListImages with a word ----------------------------------------------------
    library_rows = []
    for user in LIBRARIES:
        for word in ("unicorn", "zebra", "fox"):
            served: list[float] = []
            for _ in range(args.pages):
                began = time.perf_counter()
                await library.ListImages(
                    library_pb2.ListImagesRequest(page_size=20, query=word), metadata=metadata(user)
                )
                served.append(time.perf_counter() - began)
            page = (user, [], word, False, None, None, "all", False, None, None, 21)
            direct: dict[str, list[float]] = {"new": [], "old": []}
            for label, statement in (("new", page_statement(word)), ("old", LIST_IMAGES_SQL)):
                for _ in range(args.pages):
                    began = time.perf_counter()
                    await conn.fetch(statement, *page)
                    direct[label].append(time.perf_counter() - began)
            library_rows.append((user, word, served, direct["new"], direct["old"]))

    await channel.close()
    process.terminate()
    process.wait(timeout=60)
    await forge_runner.cleanup()

    # --- 2. the statements, explained ------------------------------------------------
    statement_rows = []
    plans_60k: dict[str, list[str]] = {}
    for user in HISTORIES:
        found = await production_statements(conn, user)
        for name, (query, query_args) in found.items():
            new_ms, new_plan = await explain(conn, query, query_args)
            before_args: tuple[Any, ...] = (user,)
            if name == "credit facts":
                before_args = (
                    user,
                    datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0),
                )
            old_ms, _old_plan = await explain(conn, BEFORE[name], before_args)
            statement_rows.append((user, name, new_ms, old_ms))
            if user == "h60k":
                plans_60k[name] = new_plan
    library_plans = {}
    for label, statement in (("new", page_statement("unicorn")), ("old", LIST_IMAGES_SQL)):
        _, library_plans[label] = await explain(
            conn,
            statement,
            ("lib100k", [], "unicorn", False, None, None, "all", False, None, None, 21),
        )
    await conn.close()
    await embedded.stop()

    load = os.getloadavg()
    print(
        f"imagegen history benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
        f"{os.cpu_count()} cores  python {platform.python_version()}  "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        f"\n1. generations ({args.rounds} rounds x {args.per_round}, N={args.concurrency}; "
        f"{args.submits} sequential submits per round)"
    )
    print(
        f"{'user':<6} {'past':>7} {'gen/s':>7} {'ratio':>6}   {'submit p50':>10} {'p99 ms':>7} {'ratio p50':>9}"
    )
    base_rate = statistics.median(rates["h0"])
    base_submit = pct(submit_latencies["h0"], 0.5)
    for user, count in HISTORIES.items():
        past = int(count * args.scale)
        rate = statistics.median(rates[user])
        p50 = pct(submit_latencies[user], 0.5)
        print(
            f"{user:<6} {past:>7} {rate:7.1f} {rate / base_rate:6.2f}   {p50:10.1f} "
            f"{pct(submit_latencies[user], 0.99):7.1f} {p50 / base_submit:9.2f}"
        )
    for user, balance in balances.items():
        print(
            f"  {user}: available {balance.available_credits}, reserved {balance.reserved_credits}"
        )

    print("\n2. statements of the checks, EXPLAIN ANALYZE execution time in ms (new | before)")
    print(f"{'user':<6} {'statement':<14} {'new':>8} {'before':>8}")
    for user, name, new_ms, old_ms in statement_rows:
        print(f"{user:<6} {name:<14} {new_ms:8.3f} {old_ms:8.3f}")
    for name, lines in plans_60k.items():
        print(f"\n  EXPLAIN ANALYZE, {name}, user h60k (new):")
        for line in lines:
            print("    " + line)

    print("\n3. ListImages page of 20 with a word (served p50/p99; bare statement p50, new | old)")
    print(f"{'user':<8} {'word':<8} {'served p50':>10} {'p99':>7}   {'new p50':>8} {'old p50':>8}")
    for user, word, served, new, old in library_rows:
        print(
            f"{user:<8} {word:<8} {pct(served, 0.5):10.2f} {pct(served, 0.99):7.2f}   "
            f"{pct(new, 0.5):8.2f} {pct(old, 0.5):8.2f}"
        )
    for label, lines in library_plans.items():
        print(f"\n  EXPLAIN ANALYZE, lib100k, 'unicorn' ({label} statement):")
        for line in lines:
            print("    " + line)


if __name__ == "__main__":
    asyncio.run(main())
