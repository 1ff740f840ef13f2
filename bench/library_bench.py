"""Benchmark: ListImages over 100,000 images of one user, with and without a
prompt-word filter, through the served RPC and as the bare SQL query (the direct path)
in the same run; prints p50/p99 per page and the query plans. Asserts nothing.

    .venv/bin/python bench/library_bench.py [--images 100000] [--pages 50]
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
from imagegen.v1 import library_pb2, library_pb2_grpc

from imagegen.embedded import start_embedded_postgres
from imagegen.identity import mint_token
from imagegen.repositories.images import page_statement
from imagegen.repositories.migrator import apply_migrations

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
WORDS = ["fox", "lighthouse", "cat", "forest", "harbour", "mountain", "river", "city", "owl"]


def page_args(word: str) -> tuple[object, ...]:
    """The page statement's parameters for a first page with an optional prompt word."""
    return ("bench", [], word, False, None, None, "all", False, None, None, 21)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def seed(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,
                                provider, prompt, created_at)
            SELECT gen_random_uuid(), 'bench', 'generated/bench/' || n || '.png', 'image/png',
                   1024, 1024, 200000, 'local',
                   'a ' || ($2::text[])[1 + n % 9] || ' at dawn, number ' || n,
                   now() - make_interval(secs => n)
              FROM generate_series(1, $1) AS n
            """,
            count,
            WORDS,
        )
        await conn.execute("ANALYZE images")
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=50)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="imagegen-libbench-"))
    tmp.chmod(0o755)
    embedded = await start_embedded_postgres(tmp / "pg")
    dsn = embedded.dsn
    await apply_migrations(dsn)
    started = time.perf_counter()
    await seed(dsn, args.images)
    print(f"seeded {args.images} images in {time.perf_counter() - started:.1f}s")

    conn = await asyncpg.connect(dsn)
    server_stack = contextlib.AsyncExitStack()
    channel = await server_stack.enter_async_context(served_channel(tmp / "data", dsn, JWT_KEY))
    metadata = (("authorization", f"Bearer {mint_token(JWT_KEY, user_id='bench')}"),)
    stub = library_pb2_grpc.ImageLibraryServiceStub(channel)

    print(f"{'filter':<12} {'path':<7} {'p50 ms':>8} {'p99 ms':>8}   ratio served/direct p50  p99")
    for label, word in (("none", ""), ("word 'foxes'", "foxes")):
        direct: list[float] = []
        served: list[float] = []
        for _ in range(args.pages):
            began = time.perf_counter()
            await conn.fetch(page_statement(word), *page_args(word))
            direct.append(time.perf_counter() - began)
        token = ""
        for _ in range(args.pages):
            began = time.perf_counter()
            page = await stub.ListImages(
                library_pb2.ListImagesRequest(page_size=20, page_token=token, query=word),
                metadata=metadata,
            )
            served.append(time.perf_counter() - began)
            token = page.next_page_token
        print(f"{label:<12} {'direct':<7} {pct(direct, 0.5):8.2f} {pct(direct, 0.99):8.2f}")
        print(
            f"{label:<12} {'served':<7} {pct(served, 0.5):8.2f} {pct(served, 0.99):8.2f}   "
            f"{pct(served, 0.5) / pct(direct, 0.5):22.2f} {pct(served, 0.99) / pct(direct, 0.99):5.2f}"
        )
    # The plan PostgreSQL really uses: the production statement, prepared and run more
    # than five times (after which a generic plan may take over), then explained.
    for number, word in enumerate(("", "foxes")):
        await conn.execute(f"PREPARE page{number} AS {page_statement(word)}")
        literal = f"('bench', '{{}}', '{word}', false, NULL, NULL, 'all', false, NULL, NULL, 21)"
        for _ in range(6):
            await conn.execute(f"EXECUTE page{number}{literal}")
        plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE page{number}{literal}")
        print(f"\nEXPLAIN ANALYZE (query {word!r}):")
        for row in plan:
            print("  " + row[0])
    print(
        f"\nmachine: {platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    await server_stack.aclose()
    await conn.close()
    await embedded.stop()


if __name__ == "__main__":
    asyncio.run(main())
