"""Applies the plain, ordered SQL files of `migrations/` to a PostgreSQL database.

Files are named `NNNN_name.sql` (four digits, then lower-case words joined by `_`)
and applied in version order. Every run holds one PostgreSQL advisory lock on a
dedicated connection, so replicas that start together migrate one at a time: the
second waits, then finds everything applied. Each pending file runs in its own
transaction together with its `schema_migrations` row (so a file must not use
statements that cannot run in a transaction, such as `CREATE INDEX CONCURRENTLY`).

The database refuses to start (`MigrationError`) when what it recorded and what is on
disk disagree: an applied file whose bytes changed (sha256 checksum), an applied
version whose file is gone, or a new file older than one already applied. These are
checked before anything is applied, so a refused run changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

#: The advisory lock key every migrator takes: the bytes of b"imagegen" as a bigint.
MIGRATION_LOCK_KEY = 0x696D6167656E6765

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<label>[a-z0-9]+(?:_[a-z0-9]+)*)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migrations cannot be applied: disk and database disagree, a file is
    misnamed or failed, or the lock was not obtained in time. Nothing half-applied
    is left behind; the service must not start."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file as found on disk."""

    version: int
    name: str  # the file name, e.g. `0001_initial.sql`
    sql: str
    checksum: str  # sha256 of the file's bytes, hex


def migrations_dir() -> Path:
    """The migrations shipped with this code: the checkout's `migrations/` when this module
    runs from a checkout (`src/imagegen/...`), else the wheel's `imagegen/_migrations`.
    MigrationError if neither exists.

    The checkout comes first because an editable install also copies the migrations into
    site-packages when it is made, and that copy misses every migration added since."""
    source_root = Path(__file__).resolve().parents[2]
    checkout = source_root.parent / "migrations"
    if source_root.name == "src" and checkout.is_dir():
        return checkout
    packaged = Path(str(resources.files("imagegen").joinpath("_migrations")))
    if packaged.is_dir():
        return packaged
    raise MigrationError(f"no migrations directory: neither {checkout} nor {packaged} exists")


def load_migrations(directory: Path) -> list[Migration]:
    """Every `NNNN_name.sql` file of `directory`, by version. A `.sql` file with
    another name, or two files with one version, is a MigrationError."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql" or not path.is_file():
            continue
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"{path.name} and {found[version].name} have the same version {version}"
            )
        data = path.read_bytes()
        found[version] = Migration(
            version=version,
            name=path.name,
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    return [found[version] for version in sorted(found)]


async def apply_migrations(
    dsn: str, *, directory: Path | None = None, lock_timeout: float = 60
) -> list[str]:
    """Applies every pending migration of `directory` (default `migrations_dir()`) and
    returns the names of those applied, in order; [] when the database is current.

    Waits up to `lock_timeout` seconds for another migrator to finish (0 waits
    forever). MigrationError if disk and database disagree, a file fails (its
    transaction is rolled back; earlier files stay applied) or the wait runs out.
    """
    migrations = load_migrations(directory if directory is not None else migrations_dir())
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        await _lock(conn, lock_timeout)
        try:
            await conn.execute(_CREATE_TABLE)
            recorded = await conn.fetch(
                "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
            )
            pending = _pending(migrations, recorded)
            applied: list[str] = []
            for migration in pending:
                await _apply(conn, migration)
                applied.append(migration.name)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _lock(conn: asyncpg.Connection, lock_timeout: float) -> None:
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
        return
    # Said before waiting: a start that hangs here is another replica migrating.
    log.info(
        "another process is applying migrations; waiting for it",
        extra={"event": "migrations.lock_wait", "lock_timeout": lock_timeout},
    )
    # lock_timeout bounds the wait for the advisory lock; it is reset at once so the
    # migrations themselves run with the server's default.
    timeout_ms = max(1, round(lock_timeout * 1000)) if lock_timeout > 0 else 0
    await conn.execute("SELECT set_config('lock_timeout', $1, false)", str(timeout_ms))
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    except asyncpg.LockNotAvailableError as exc:
        raise MigrationError(
            f"another migrator held the migration lock for more than {lock_timeout:g} s"
        ) from exc
    finally:
        await conn.execute("RESET lock_timeout")


def _pending(migrations: list[Migration], recorded: list[asyncpg.Record]) -> list[Migration]:
    on_disk = {migration.version: migration for migration in migrations}
    problems: list[str] = []
    for row in recorded:
        migration = on_disk.get(row["version"])
        if migration is None:
            problems.append(f"{row['name']} was applied but is missing from disk")
        elif migration.name != row["name"]:
            problems.append(f"{migration.name} was applied as {row['name']}; do not rename it")
        elif migration.checksum != row["checksum"]:
            problems.append(
                f"{migration.name} changed after it was applied (checksum "
                f"{row['checksum'][:12]}… recorded, {migration.checksum[:12]}… on disk); "
                "add a new migration instead of editing an applied one"
            )
    applied_versions = {row["version"] for row in recorded}
    newest_applied = max(applied_versions, default=0)
    pending = [m for m in migrations if m.version not in applied_versions]
    problems += [
        f"{m.name} is pending but older than applied version {newest_applied:04d}; "
        "give it a higher number"
        for m in pending
        if m.version < newest_applied
    ]
    if problems:
        raise MigrationError("refusing to migrate: " + "; ".join(problems))
    return pending


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"{migration.name} failed and was rolled back: {exc}") from exc
