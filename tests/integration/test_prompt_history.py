"""The prompt index of suggestions (migrations/0008_prompt_assist.sql) against a real
PostgreSQL: the triggers keep each user's prompt counts current whatever changes an
image, edits and empty prompts stay out, one row per prompt however it is spelled, the
images stored before the migration are counted, and the candidate query reads only the
caller's rows."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from imagegen.repositories.migrator import apply_migrations, migrations_dir
from imagegen.repositories.prompts import PromptCandidates

COUNTS = "images_made, live_images, kept_images, deleted_images"


async def add_image(
    conn: asyncpg.Connection,
    user: str,
    prompt: str,
    *,
    favorite: bool = False,
    is_edit: bool = False,
    style: str = "",
) -> uuid.UUID:
    image_id = uuid.uuid4()
    await conn.execute(
        """
        INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,
                            provider, prompt, favorite, is_edit, style)
        VALUES ($1, $2, $3, 'image/png', 8, 8, 1, 'local', $4, $5, $6, $7)
        """,
        image_id,
        user,
        f"k/{image_id}",
        prompt,
        favorite,
        is_edit,
        style,
    )
    return image_id


async def counts(conn: asyncpg.Connection, user: str) -> dict[str, tuple[Any, ...]]:
    rows = await conn.fetch(
        f"SELECT prompt_key, {COUNTS} FROM prompt_history WHERE user_id = $1",
        user,
    )
    return {r["prompt_key"]: tuple(r)[1:] for r in rows}


async def test_the_triggers_keep_the_counts_current(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        first = await add_image(conn, "alice", "A red   fox", style="cinematic")
        second = await add_image(conn, "alice", "a red fox ", favorite=True)
        await add_image(conn, "alice", "invert the colours", is_edit=True)
        await add_image(conn, "alice", "   ")
        await add_image(conn, "bob", "a red fox")
        assert await counts(conn, "alice") == {"a red fox": (2, 2, 1, 0)}
        assert await counts(conn, "bob") == {"a red fox": (1, 1, 0, 0)}
        row = await conn.fetchrow("SELECT prompt, style FROM prompt_history WHERE user_id='alice'")
        assert tuple(row) == ("a red fox ", "")  # as last written

        async def change(sql: str, image: uuid.UUID) -> dict[str, tuple[Any, ...]]:
            await conn.execute(sql, image)
            return await counts(conn, "alice")

        soft_delete = "UPDATE images SET deleted_at = now() WHERE id = $1"
        restore = "UPDATE images SET deleted_at = NULL WHERE id = $1"
        assert await change(soft_delete, second) == {"a red fox": (2, 1, 0, 1)}
        # Favouriting a deleted image keeps nothing.
        assert await change("UPDATE images SET favorite = true WHERE id = $1", first) == {
            "a red fox": (2, 1, 1, 1)
        }
        assert await change(restore, second) == {"a red fox": (2, 2, 2, 0)}
        assert await change("UPDATE images SET favorite = false WHERE id = $1", second) == {
            "a red fox": (2, 2, 1, 0)
        }
        # Other changes leave the counts alone.
        assert await change("UPDATE images SET title = 'x' WHERE id = $1", first) == {
            "a red fox": (2, 2, 1, 0)
        }
        # Purged: a live favourite counts as deleted; a soft-deleted one stays deleted.
        assert await change("DELETE FROM images WHERE id = $1", first) == {
            "a red fox": (2, 1, 0, 1)
        }
        await conn.execute(soft_delete, second)
        assert await change("DELETE FROM images WHERE id = $1", second) == {
            "a red fox": (2, 0, 0, 2)
        }
        assert await counts(conn, "bob") == {"a red fox": (1, 1, 0, 0)}
    finally:
        await conn.close()


async def test_images_stored_before_the_migration_are_counted(
    empty_database_url: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for migration in sorted(migrations_dir().glob("*.sql")):
        if migration.name < "0008":
            shutil.copy(migration, before)
    await apply_migrations(empty_database_url, directory=before)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await add_image(conn, "alice", "a castle", favorite=True)
        await add_image(conn, "alice", "A  castle")
        deleted = await add_image(conn, "alice", "a moat")
        await conn.execute("UPDATE images SET deleted_at = now() WHERE id = $1", deleted)
        await add_image(conn, "alice", "flip it", is_edit=True)
        shutil.copy(migrations_dir() / "0008_prompt_assist.sql", before)
        assert await apply_migrations(empty_database_url, directory=before) == [
            "0008_prompt_assist.sql"
        ]
        assert await counts(conn, "alice") == {
            "a castle": (2, 2, 1, 0),
            "a moat": (1, 0, 0, 1),
        }
        assert await conn.fetchval("SELECT count(*) FROM usage_records") == 0
        assert (
            await conn.fetchval(
                "SELECT column_default FROM information_schema.columns "
                "WHERE table_name = 'usage_records' AND column_name = 'kind'"
            )
            == "'generation'::text"
        )
    finally:
        await conn.close()


async def test_candidates_are_the_callers_own_and_bounded(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        for n in range(30):
            await add_image(conn, "alice", f"a harbour at dusk number {n}")
            await add_image(conn, "bob", f"a harbour at dusk number {n}, bob")
        await add_image(conn, "bob", "a 100% _special_ harbour")
        candidates = PromptCandidates(pool)

        async def find(user: str, text: str, **kwargs: Any) -> list[str]:
            options = {"prefix": True, "anywhere": True, "recent": 5, "per_branch": 4}
            history, _ = await candidates.find(user, "", text, **{**options, **kwargs}, templates=0)
            return [h.prompt for h in history]

        found = await find("alice", "harbour at dusk")
        # recent 5 + prefix (none start with it) + contains 4, all hers.
        assert 5 <= len(found) <= 9
        assert all(p.startswith("a harbour at dusk number") for p in found)
        # Eleven of hers match (1, 10-19), none among the five most recent: each branch
        # reads at most four rows.
        narrower = await find("alice", "a harbour at dusk number 1")
        assert len(narrower) == 4
        assert all(p.startswith("a harbour at dusk number 1") for p in narrower)
        assert await find("alice", "nothing like it") == []
        # LIKE's wildcards in the text are plain characters.
        assert await find("bob", "100% _special") == ["a 100% _special_ harbour"]
        assert await find("bob", "1%0") == []
        # Empty text: kept prompts only (none here).
        assert await find("alice", "", prefix=False, anywhere=False) == []
    finally:
        await pool.close()
        await conn.close()
