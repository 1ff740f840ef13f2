"""Benchmark: SuggestPrompts for a user with 10,000 prompts (among 50,000 of other users),
through the served RPC and as the bare queries (the direct path) in the same run; prints
p50/p99 per typed text and over all of them, and EXPLAIN ANALYZE of the production
statement. Asserts nothing.

    .venv/bin/python bench/suggest_bench.py [--prompts 10000] [--others 50] [--runs 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path

import asyncpg
from harness import served_channel
from imagegen.v1 import prompts_pb2, prompts_pb2_grpc

from imagegen.domain.suggestions import searchable
from imagegen.embedded import start_embedded_postgres
from imagegen.identity import mint_token
from imagegen.repositories.migrator import apply_migrations
from imagegen.repositories.prompts import SUGGEST_HISTORY_SQL, PromptCandidates

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
ADJECTIVES = ["a red", "a small", "an ancient", "a futuristic", "a quiet", "a snowy", "a golden",
              "a misty", "a neon", "a tiny", "a giant", "a lonely"]  # fmt: skip
SUBJECTS = ["fox", "lighthouse", "cat", "forest", "harbour", "mountain", "river", "city", "owl",
            "robot", "castle", "dragon", "garden", "ship", "train", "bicycle",
            "portrait of a woman", "old man", "market", "bridge"]  # fmt: skip
PLACES = ["at dawn", "at night", "in the rain", "under the stars", "by the sea", "in autumn",
          "in a forest", "on a hill", "in the city", "in winter"]  # fmt: skip
STYLES = ["oil painting", "watercolor", "photograph", "3d render", "pixel art", "anime",
          "cinematic lighting", "studio lighting", "35mm film"]  # fmt: skip
#: What a user types, from nothing to a long exact start.
TEXTS = ["", "a", "a r", "a red f", "fox", "lighthouse at d", "detail 12", "zzz",
         "a red fox at dawn, watercolor, detail 1"]  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def seed(dsn: str, prompts: int, others: int) -> None:
    """One image per prompt, through the images table (so the triggers build the index):
    `prompts` distinct prompts for user `bench`, 1,000 for each of `others` users; a
    tenth of the images favourites, another tenth deleted; ten templates each."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT setseed(0.42)")
        for user, count in [("bench", prompts), *((f"other{i}", 1000) for i in range(others))]:
            await conn.execute(
                """
                INSERT INTO images (id, user_id, storage_key, mime_type, width, height,
                                    size_bytes, provider, prompt, favorite, deleted_at,
                                    created_at)
                SELECT gen_random_uuid(), $1, 'bench/' || $1 || '/' || n, 'image/png',
                       512, 512, 1, 'local',
                       ($3::text[])[1 + n % 12] || ' ' || ($4::text[])[1 + (n / 12) % 20] || ' '
                         || ($5::text[])[1 + (n / 240) % 10] || ', '
                         || ($6::text[])[1 + (n / 2400) % 9] || ', detail ' || n,
                       n % 10 = 3, CASE WHEN n % 10 = 7 THEN now() END,
                       now() - make_interval(secs => n)
                  FROM generate_series(1, $2) AS n
                """,
                user,
                count,
                ADJECTIVES,
                SUBJECTS,
                PLACES,
                STYLES,
            )
            await conn.execute(
                """
                INSERT INTO prompt_templates (id, owner_id, name, prompt)
                SELECT gen_random_uuid(), $1, 'template ' || n,
                       'a {{subject}} at dawn, watercolor, variant ' || n
                  FROM generate_series(1, 10) AS n
                """,
                user,
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--others", type=int, default=50)
    parser.add_argument("--runs", type=int, default=40, help="calls per text and path")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="imagegen-suggestbench-"))
    tmp.chmod(0o755)
    embedded = await start_embedded_postgres(tmp / "pg")
    dsn = embedded.dsn
    await apply_migrations(dsn)
    started = time.perf_counter()
    await seed(dsn, args.prompts, args.others)
    conn = await asyncpg.connect(dsn)
    rows = await conn.fetchval("SELECT count(*) FROM prompt_history")
    mine = await conn.fetchval("SELECT count(*) FROM prompt_history WHERE user_id = 'bench'")
    print(
        f"seeded {rows} prompts ({mine} of the bench user) in {time.perf_counter() - started:.1f}s"
    )

    server_stack = contextlib.AsyncExitStack()
    channel = await server_stack.enter_async_context(served_channel(tmp / "data", dsn, JWT_KEY))
    metadata = (("authorization", f"Bearer {mint_token(JWT_KEY, user_id='bench')}"),)
    stub = prompts_pb2_grpc.PromptAssistantServiceStub(channel)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    candidates = PromptCandidates(pool)

    async def direct(text: str) -> None:
        # The two statements of the production path, in its read-only transaction, as
        # the use case asks for them (limit 10), without ranking, gRPC or the JWT.
        await candidates.find(
            "bench",
            "",
            text,
            prefix=bool(text.strip()),
            anywhere=searchable(text),
            recent=100,
            per_branch=50,
            templates=50,
        )

    async def served(text: str) -> None:
        await stub.SuggestPrompts(prompts_pb2.SuggestPromptsRequest(text=text), metadata=metadata)

    for text in TEXTS:  # warm both paths (connections, caches, prepared statements)
        await direct(text)
        await served(text)
    print(f"\n{'text':<42} {'path':<7} {'p50 ms':>8} {'p99 ms':>8}   ratio served/direct p50  p99")
    totals: dict[str, list[float]] = {"direct": [], "served": []}
    for text in TEXTS:
        times: dict[str, list[float]] = {"direct": [], "served": []}
        for _ in range(args.runs):
            for name, call in (("direct", direct), ("served", served)):
                began = time.perf_counter()
                await call(text)
                times[name].append(time.perf_counter() - began)
        label = repr(text) if len(text) < 40 else repr(text[:36]) + "..."
        for name in ("direct", "served"):
            totals[name] += times[name]
            ratio = ""
            if name == "served":
                p50 = pct(times["served"], 0.5) / pct(times["direct"], 0.5)
                p99 = pct(times["served"], 0.99) / pct(times["direct"], 0.99)
                ratio = f"{p50:22.2f} {p99:5.2f}"
            line = f"{label:<42} {name:<7} "
            print(line + f"{pct(times[name], 0.5):8.2f} {pct(times[name], 0.99):8.2f}   {ratio}")
    print(
        f"{'all texts':<42} {'direct':<7} {pct(totals['direct'], 0.5):8.2f} "
        f"{pct(totals['direct'], 0.99):8.2f}\n"
        f"{'all texts':<42} {'served':<7} {pct(totals['served'], 0.5):8.2f} "
        f"{pct(totals['served'], 0.99):8.2f}   "
        f"{pct(totals['served'], 0.5) / pct(totals['direct'], 0.5):22.2f} "
        f"{pct(totals['served'], 0.99) / pct(totals['direct'], 0.99):5.2f}"
    )

    # The plan PostgreSQL uses for the production statement: prepared, with custom plans
    # as the repository asks for, run more than five times, then explained.
    await conn.execute("SET plan_cache_mode = force_custom_plan")
    await conn.execute(f"PREPARE suggest AS {SUGGEST_HISTORY_SQL}")
    for text in ("a red f", "zzz"):
        literal = f"('bench', '{text}', true, {str(searchable(text)).lower()}, true, 100, 50)"
        for _ in range(6):
            await conn.execute(f"EXECUTE suggest{literal}")
        plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE suggest{literal}")
        print(f"\nEXPLAIN ANALYZE (text {text!r}):")
        for row in plan:
            print("  " + row[0])
    print(
        f"\nmachine: {platform.node()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    await pool.close()
    await server_stack.aclose()
    await conn.close()
    await embedded.stop()


if __name__ == "__main__":
    asyncio.run(main())
