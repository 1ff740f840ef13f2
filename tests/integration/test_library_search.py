"""ListImages with a word: the page statement walks the newest images and asks the
full-text index for older matches (repositories/images.py LIST_IMAGES_TEXT_SQL). Every
page equals what a plain filter over all rows gives, for common, rare and absent words,
across the walked window's edge, with the other filters and with other users' rows."""

from __future__ import annotations

import json

import asyncpg
import pytest

from imagegen.domain.library import ImageQuery
from imagegen.domain.paging import Cursor
from imagegen.repositories.db import open_pool
from imagegen.repositories.images import TEXT_WALK_ROWS, LibraryQueries, page_statement

IMAGES = 5 * TEXT_WALK_ROWS


@pytest.fixture(scope="module")
async def library(module_database_url: str) -> str:
    conn = await asyncpg.connect(module_database_url)
    try:
        # alice: n = 1 is the newest. Every 7th is a fox, a zebra only at a few places on
        # both sides of the walked window, every 5th a favourite, every 11th deleted;
        # bob has foxes and a few zebras of his own. Few distinct words, as in
        # bench/library_bench.py: the planner estimates any word it has no statistics
        # for at 0.5 % of the rows, and a plain filtered walk would read every row.
        await conn.execute(
            """
            INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,
                                provider, prompt, favorite, deleted_at, created_at)
            SELECT gen_random_uuid(), 'alice', 'k/a/' || n, 'image/png', 8, 8, 1, 'local',
                   CASE WHEN n % 7 = 0 THEN 'a fox ' ELSE 'a hill ' END
                   || CASE WHEN n IN (3, 40, 999, 1000, 1001, 1002, 1200, 1500, 2999, 4999)
                           THEN 'zebra ' ELSE '' END || 'at dawn',
                   n % 5 = 0,
                   CASE WHEN n % 11 = 0 THEN timestamptz '2026-01-01' END,
                   timestamptz '2026-06-01' - make_interval(secs => n / 2)
              FROM generate_series(1, $1) AS n
            UNION ALL
            SELECT gen_random_uuid(), 'bob', 'k/b/' || n, 'image/png', 8, 8, 1, 'local',
                   CASE WHEN n % 500 = 0 THEN 'a zebra' ELSE 'a fox' END, false, NULL,
                   timestamptz '2026-06-01' - make_interval(secs => n)
              FROM generate_series(1, 3000) AS n
            """,
            IMAGES,
        )
        await conn.execute("ANALYZE images")
    finally:
        await conn.close()
    return module_database_url


async def every_page(dsn: str, query: ImageQuery, size: int) -> list[str]:
    pool = await open_pool(dsn, max_size=1)
    try:
        queries = LibraryQueries(pool)
        seen: list[str] = []
        cursor: Cursor | None = None
        while True:
            page = await queries.list_for_user("alice", query, after=cursor, limit=size)
            seen += [image.id for image in page]
            if len(page) < size:
                return seen
            cursor = Cursor(page[-1].created_at, page[-1].id)
    finally:
        await pool.close()


async def plain_filter(dsn: str, where: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT id FROM images WHERE user_id = 'alice' AND {where} "
            "ORDER BY created_at DESC, id DESC"
        )
    finally:
        await conn.close()
    return [str(r["id"]) for r in rows]


@pytest.mark.parametrize(
    ("query", "where", "size"),
    [
        (ImageQuery(text="zebras"), "search @@ 'zebra' AND deleted_at IS NULL", 2),
        (ImageQuery(text="zebra"), "search @@ 'zebra' AND deleted_at IS NULL", 21),
        (
            ImageQuery(text="zebra", show_deleted=True),
            "search @@ 'zebra'",
            3,
        ),
        (
            ImageQuery(text="fox", favorites_only=True),
            "search @@ 'fox' AND favorite AND deleted_at IS NULL",
            50,
        ),
        (ImageQuery(text="fox"), "search @@ 'fox' AND deleted_at IS NULL", 100),
        (ImageQuery(text="unicorn"), "false", 20),
    ],
)
async def test_word_pages_equal_a_plain_filter(
    library: str, query: ImageQuery, where: str, size: int
) -> None:
    paged = await every_page(library, query, size)
    assert paged == await plain_filter(library, where)
    assert len(paged) == len(set(paged))


def rows_read(plan: dict[str, object]) -> int:
    """Rows a plan node and its children read from `images`: those they returned plus
    those their filters removed."""
    own = 0
    if plan.get("Relation Name") == "images":
        own = int(plan.get("Actual Rows", 0)) * int(plan.get("Actual Loops", 1)) + int(
            plan.get("Rows Removed by Filter", 0)
        )
    children = plan.get("Plans", [])
    assert isinstance(children, list)
    return own + sum(rows_read(child) for child in children)


@pytest.mark.parametrize("word", ["unicorn", "zebra", "fox"])
async def test_a_word_search_reads_a_bounded_window_not_the_history(
    library: str, word: str
) -> None:
    conn = await asyncpg.connect(library)
    try:
        statement = page_statement(word)
        await conn.execute(f"PREPARE page AS {statement}")
        arguments = f"('alice', '{{}}', '{word}', false, NULL, NULL, 'all', false, NULL, NULL, 21)"
        # Past five runs PostgreSQL may switch to a generic plan: look at that one too.
        for _ in range(6):
            await conn.execute(f"EXECUTE page{arguments}")
        [row] = await conn.fetch(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page{arguments}")
    finally:
        await conn.close()
    plan = json.loads(row[0])[0]["Plan"]
    # alice has 5,000 images; a page reads the walked window (twice when the word is
    # rare: once for the matches, once for the window's edge; a tenth more for the
    # deleted ones skipped) and the word's matches (a dozen of alice's and bob's), never
    # her whole history.
    assert rows_read(plan) <= 2.5 * TEXT_WALK_ROWS, plan
