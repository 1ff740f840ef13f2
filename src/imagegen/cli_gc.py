"""`imagegen gc [--dry-run]`: one retention pass from the command line, against the
database and blob store the settings name (an operator's tool, like `imagegen credits`).
It prints counts and bytes by kind; `--dry-run` prints what a pass would remove and
changes nothing."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

from imagegen.config import Settings
from imagegen.storage.base import BlobStore

EXIT_BUSY = 3


def add_parser(sub: Any) -> None:
    """The `gc` command."""
    gc = sub.add_parser(
        "gc",
        help="run one retention pass: purge soft-deleted images and unkept uploads past "
        "their plan's period, compact old event logs, sweep orphaned blobs",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="print what would be removed; change nothing"
    )
    gc.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the orphan sweep (it lists every image blob in the store)",
    )


async def run_gc(settings: Settings, args: argparse.Namespace) -> int:
    """Run the pass; 0 when it ran, EXIT_BUSY when a replica's reaper holds the lock."""
    import asyncpg

    from imagegen.domain.plans import PlanTable
    from imagegen.repositories.db import open_pool
    from imagegen.repositories.retention import RetentionRepository
    from imagegen.services.retention import RetentionService, RetentionSettings

    async with _database(settings) as dsn, _blob_store(settings) as blobs:
        pool = await open_pool(dsn, max_size=3)
        try:
            service = RetentionService(
                RetentionRepository(pool),
                blobs,
                PlanTable.load(settings.plans_file),
                RetentionSettings(
                    batch_size=settings.gc.batch_size,
                    orphan_grace=settings.gc.orphan_grace,
                    sweep_interval=settings.gc.sweep_interval,
                ),
            )
            report = await service.run_pass(dry_run=args.dry_run, sweep=not args.no_sweep)
        except asyncpg.UndefinedTableError:
            print(
                "imagegen: the retention tables are missing; run `imagegen migrate`",
                file=sys.stderr,
            )
            return 1
        finally:
            await pool.close()
    if report is None:
        print(
            "imagegen: a reaper is running a retention pass right now; try again later",
            file=sys.stderr,
        )
        return EXIT_BUSY
    print("\n".join(report.lines()))
    return 0


@contextlib.asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[str]:
    from imagegen.embedded import start_embedded_postgres

    if settings.database_url is not None:
        yield settings.database_url
        return
    embedded = await start_embedded_postgres(settings.data_dir)
    try:
        yield embedded.dsn
    finally:
        await embedded.stop()


@contextlib.asynccontextmanager
async def _blob_store(settings: Settings) -> AsyncIterator[BlobStore]:
    from imagegen.storage.local import LocalBlobStore, load_or_create_signing_key
    from imagegen.storage.s3 import open_s3_store

    if settings.s3 is not None:
        async with open_s3_store(settings.s3) as store:
            yield store
        return
    # Signed URLs are never made here; the key only satisfies the store.
    yield LocalBlobStore(
        settings.data_dir / "blobs", "", load_or_create_signing_key(settings.data_dir)
    )
