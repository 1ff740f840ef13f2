"""The migrator against a real PostgreSQL: fresh apply, idempotence, the advisory
lock between two migrators, and refusal when disk and database disagree."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagegen.repositories.migrator import (
    MIGRATION_LOCK_KEY,
    MigrationError,
    apply_migrations,
    load_migrations,
    migrations_dir,
)

EXPECTED_TABLES = {
    "schema_migrations",
    "generations",
    "generation_events",
    "images",
    "image_parents",
    "usage_records",
    "prompt_templates",
    "user_settings",
}


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def _tables(dsn: str) -> set[str]:
    rows = await _fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return {row["tablename"] for row in rows}


async def _recorded(dsn: str) -> list[tuple[Any, ...]]:
    rows = await _fetch(
        dsn, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    )
    return [tuple(row) for row in rows]


async def _catalog(dsn: str) -> list[tuple[Any, ...]]:
    """Every relation, column, index and constraint of the schema, in a stable order."""
    columns = await _fetch(
        dsn,
        """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = current_schema()
        ORDER BY table_name, column_name
        """,
    )
    indexes = await _fetch(
        dsn,
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
        "ORDER BY indexname",
    )
    constraints = await _fetch(
        dsn,
        """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = current_schema()::regnamespace
        ORDER BY 1, 2
        """,
    )
    return [tuple(row) for row in [*columns, *indexes, *constraints]]


def _copy_migrations(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), directory)
    return directory


class LockWaitAnnounced(logging.Handler):
    """Set when a migrator says it found the migration lock taken and waits for it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.heard = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", "") == "migrations.lock_wait":
            self.heard.set()


@contextlib.contextmanager
def lock_wait_announced() -> Iterator[asyncio.Event]:
    logger = logging.getLogger("imagegen.repositories.migrator")
    handler, level = LockWaitAnnounced(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.heard
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_migrations_dir_holds_the_initial_migration() -> None:
    names = [m.name for m in load_migrations(migrations_dir())]
    assert names[0] == "0001_initial.sql"


async def test_apply_on_empty_database_creates_the_schema(empty_database_url: str) -> None:
    assert await _tables(empty_database_url) == set()

    applied = await apply_migrations(empty_database_url)

    assert applied == [m.name for m in load_migrations(migrations_dir())]
    assert EXPECTED_TABLES <= await _tables(empty_database_url)
    recorded = await _recorded(empty_database_url)
    assert [(v, n, c) for v, n, c, _ in recorded] == [
        (m.version, m.name, m.checksum) for m in load_migrations(migrations_dir())
    ]


async def test_applying_twice_changes_nothing(empty_database_url: str) -> None:
    await apply_migrations(empty_database_url)
    recorded = await _recorded(empty_database_url)
    catalog = await _catalog(empty_database_url)

    assert await apply_migrations(empty_database_url) == []

    assert await _recorded(empty_database_url) == recorded
    assert await _catalog(empty_database_url) == catalog


async def test_second_migrator_waits_for_the_lock_then_succeeds(empty_database_url: str) -> None:
    holder = await asyncpg.connect(empty_database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with lock_wait_announced() as waiting:
            task = asyncio.create_task(apply_migrations(empty_database_url))
            # It found the lock taken: it cannot finish before the holder lets go.
            await asyncio.wait_for(waiting.wait(), timeout=30)
        assert not task.done()
        assert await _tables(empty_database_url) == set()

        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        applied = await asyncio.wait_for(task, timeout=30)
    finally:
        await holder.close()

    assert applied == [m.name for m in load_migrations(migrations_dir())]
    assert EXPECTED_TABLES <= await _tables(empty_database_url)


async def test_concurrent_migrators_apply_each_file_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(apply_migrations(empty_database_url) for _ in range(3)))

    everything = [m.name for m in load_migrations(migrations_dir())]
    assert sorted(results, key=len) == [[], [], everything]
    assert len(await _recorded(empty_database_url)) == len(everything)


async def test_lock_wait_is_bounded(empty_database_url: str) -> None:
    holder = await asyncpg.connect(empty_database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with pytest.raises(MigrationError, match="lock"):
            await apply_migrations(empty_database_url, lock_timeout=0.2)
    finally:
        await holder.close()
    assert await _tables(empty_database_url) == set()


async def test_edited_applied_migration_is_refused_and_nothing_changes(
    empty_database_url: str, tmp_path: Path
) -> None:
    directory = _copy_migrations(tmp_path)
    await apply_migrations(empty_database_url, directory=directory)
    recorded = await _recorded(empty_database_url)
    catalog = await _catalog(empty_database_url)

    initial = directory / "0001_initial.sql"
    initial.write_text(initial.read_text() + "\nCREATE TABLE sneaked_in (id int);\n")
    # A new, valid migration must not be applied either while the old one is refused.
    (directory / "9000_later.sql").write_text("CREATE TABLE later_table (id int);\n")

    with pytest.raises(MigrationError, match=r"0001_initial\.sql"):
        await apply_migrations(empty_database_url, directory=directory)

    assert await _recorded(empty_database_url) == recorded
    assert await _catalog(empty_database_url) == catalog


async def test_applied_migration_missing_from_disk_is_refused(
    empty_database_url: str, tmp_path: Path
) -> None:
    directory = _copy_migrations(tmp_path)
    (directory / "9000_later.sql").write_text("CREATE TABLE later_table (id int);\n")
    await apply_migrations(empty_database_url, directory=directory)
    (directory / "9000_later.sql").unlink()

    with pytest.raises(MigrationError, match=r"9000_later\.sql.*missing"):
        await apply_migrations(empty_database_url, directory=directory)


async def test_new_migration_is_applied_alone(empty_database_url: str, tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path)
    await apply_migrations(empty_database_url, directory=directory)
    (directory / "9000_later.sql").write_text("CREATE TABLE later_table (id int);\n")

    assert await apply_migrations(empty_database_url, directory=directory) == ["9000_later.sql"]
    assert "later_table" in await _tables(empty_database_url)


async def test_failing_migration_is_rolled_back(empty_database_url: str, tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path)
    (directory / "9000_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;\n"
    )

    with pytest.raises(MigrationError, match=r"9000_broken\.sql"):
        await apply_migrations(empty_database_url, directory=directory)

    # Earlier files stay applied; the broken one left neither its table nor its row.
    tables = await _tables(empty_database_url)
    assert "generations" in tables
    assert "half_done" not in tables
    shipped = [m.name for m in load_migrations(migrations_dir())]
    assert [row[1] for row in await _recorded(empty_database_url)] == shipped


async def test_misnamed_migration_file_is_refused(tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path)
    (directory / "2_oops.sql").write_text("SELECT 1;\n")

    with pytest.raises(MigrationError, match=r"2_oops\.sql"):
        load_migrations(directory)
