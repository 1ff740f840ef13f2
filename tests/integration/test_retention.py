"""The retention reaper against a real PostgreSQL and real blob stores (S3 through moto,
and local files), run with its clock moved forward: it purges what the plans say and
nothing else, keeps rows and blobs consistent through a crash between the two deletes,
sweeps orphaned blobs once they are older than the grace period, keeps per-user storage
exact, and compacts old event logs (a compacted job replays from its first kept event)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
)

from imagegen.config import S3Settings
from imagegen.domain.errors import StorageFailed
from imagegen.domain.models import StoredImage
from imagegen.domain.plans import PlanTable
from imagegen.domain.retention import RetentionKind
from imagegen.repositories.db import open_pool
from imagegen.repositories.images import ImageRepository
from imagegen.repositories.retention import RETENTION_LOCK_KEY, RetentionRepository
from imagegen.services.retention import RetentionService, RetentionSettings
from imagegen.storage.base import BlobEntry, BlobStore
from imagegen.storage.keys import blob_key, source_key
from imagegen.storage.local import LocalBlobStore
from imagegen.storage.s3 import open_s3_store
from tests.inprocess import TEST_JWT_KEY, UNLIMITED_PLANS, serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS

DAY = timedelta(days=1)
PLANS = PlanTable.from_json(
    json.dumps(
        {
            "plans": {
                "free": {},  # the defaults: 30 days, 7 days, 30 days
                "pro": {
                    "deleted_image_retention_days": 90,
                    "event_log_retention_days": None,
                    "upload_retention_days": 30,
                },
            }
        }
    )
)
SETTINGS = RetentionSettings(
    batch_size=3, orphan_grace=timedelta(hours=1), sweep_interval=timedelta(days=1)
)


class Clock:
    """The reaper's clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_pool(database_url, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> AsyncIterator[BlobStore]:
    if request.param == "s3":
        async with open_s3_store(S3Settings(s3_endpoint, s3_bucket, "us-east-1", "pre")) as s3:
            yield s3
        return
    yield LocalBlobStore(tmp_path / "blobs", "http://127.0.0.1:1", b"k" * 32)


@dataclass
class World:
    """Rows and blobs made for a test, by name."""

    pool: asyncpg.Pool
    store: BlobStore
    base: datetime
    images: dict[str, StoredImage] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)

    async def job(
        self,
        name: str,
        *,
        user: str = "alice",
        plan: str = "free",
        state: str = "completed",
        ended: timedelta = timedelta(0),
        spec: dict[str, Any] | None = None,
        events: tuple[str, ...] = (),
    ) -> str:
        job_id = str(uuid.uuid4())
        await self.pool.execute(
            """
            INSERT INTO generations (id, user_id, fingerprint, prompt, width, height,
                                     image_count, output_format, spec, provider, state,
                                     created_at, completed_at, last_sequence)
            VALUES ($1, $2, '{}'::jsonb, 'p', 1, 1, 1, 'png', $3, 'local', $4, $5, $6, $7)
            """,
            uuid.UUID(job_id),
            user,
            {"plan": plan, **(spec or {})},
            state,
            self.base + ended - timedelta(minutes=5),
            self.base + ended if state in ("completed", "failed", "cancelled") else None,
            len(events),
        )
        for sequence, event_type in enumerate(events, start=1):
            await self.pool.execute(
                "INSERT INTO generation_events (generation_id, sequence, event_type, payload, "
                "preview) VALUES ($1, $2, $3, $4, $5)",
                uuid.UUID(job_id),
                sequence,
                event_type,
                {"percent": sequence},
                b"p" * 1000 if event_type == "progress" else None,
            )
        self.jobs[name] = job_id
        return job_id

    async def image(
        self,
        name: str,
        *,
        job: str,
        user: str = "alice",
        upload: bool = False,
        age: timedelta = timedelta(0),
        deleted: timedelta | None = None,
        favorite: bool = False,
        tags: tuple[str, ...] = (),
        parents: tuple[str, ...] = (),
        size: int = 100,
    ) -> StoredImage:
        image_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        if upload:
            key = source_key(user, "png", now)
        else:
            key = blob_key(user, image_id, "png", now)
        data = bytes([len(self.images) % 256]) * size
        await self.store.put(key, data, "image/png")
        image = StoredImage(
            id=image_id,
            user_id=user,
            generation_id=self.jobs[job],
            storage_key=key,
            mime_type="image/png",
            width=1,
            height=1,
            size_bytes=size,
            provider="upload" if upload else "local",
            model="",
            prompt="p",
            created_at=now,
            index=len(self.images),
            upload=upload,
            parent_ids=tuple(self.images[p].id for p in parents),
        )
        stored = await ImageRepository(self.pool).insert(image)
        assert stored is not None
        await self.pool.execute(
            "UPDATE images SET created_at = $2, deleted_at = $3, favorite = $4, tags = $5 "
            "WHERE id = $1",
            uuid.UUID(image_id),
            self.base - age,
            None if deleted is None else self.base + deleted,
            favorite,
            list(tags),
        )
        self.images[name] = image
        return image

    async def alive(self) -> set[str]:
        rows = await self.pool.fetch("SELECT id FROM images")
        ids = {str(r["id"]) for r in rows}
        return {name for name, image in self.images.items() if image.id in ids}

    async def blobs(self) -> set[str]:
        keys = {entry.key async for entry in self.store.list_keys("")}
        return {name for name, image in self.images.items() if image.storage_key in keys}

    async def assert_storage_exact(self) -> None:
        rows = await self.pool.fetch(
            """
            SELECT u.user_id, u.used_bytes,
                   (SELECT coalesce(sum(size_bytes), 0) FROM images i
                     WHERE i.user_id = u.user_id) AS summed
              FROM storage_usage u
            """
        )
        assert rows and all(r["used_bytes"] == r["summed"] for r in rows), rows


def service(world: World, clock: Clock, store: BlobStore | None = None) -> RetentionService:
    return RetentionService(
        RetentionRepository(world.pool), store or world.store, PLANS, SETTINGS, clock=clock
    )


async def build(world: World) -> None:
    """The rows the main test purges from (or keeps), seen 31 days after `base`."""
    free_old_events = ("queued", "started", "progress", "progress", "image_ready", "progress",
                       "image_ready", "completed")  # fmt: skip
    await world.job("free-old", events=free_old_events)
    await world.job("free-recent", ended=28 * DAY, events=("queued", "progress", "completed"))
    await world.job("pro-old", plan="pro", events=("queued", "progress", "failed"))
    await world.job("running", state="running", events=("queued", "started", "progress"))
    await world.job("bob-job", user="bob", events=("queued", "progress", "cancelled"))
    # Soft-deleted images.
    await world.image("deleted-old", job="free-old", deleted=timedelta(0))
    await world.image("deleted-recent", job="free-old", deleted=20 * DAY)
    await world.image("deleted-pro", job="pro-old", deleted=timedelta(0))
    await world.image("bob-deleted", job="bob-job", user="bob", deleted=timedelta(0), size=333)
    await world.image("bob-kept", job="bob-job", user="bob", size=444)
    # Uploads of the old job, 31 days old at the reaper's now unless said otherwise.
    await world.image("upload-unkept", job="free-old", upload=True, size=1000)
    await world.image("upload-favorite", job="free-old", upload=True, favorite=True)
    await world.image("upload-tagged", job="free-old", upload=True, tags=("keep",))
    await world.image("upload-recent", job="free-old", upload=True, age=-20 * DAY)
    await world.image("upload-parent-of-live", job="free-old", upload=True)
    await world.image("upload-parent-of-deleted", job="free-old", upload=True)
    await world.image("upload-queued-source", job="free-old", upload=True)
    await world.image("upload-queued-mask", job="free-old", upload=True)
    await world.image("live", job="free-old", parents=("upload-parent-of-live",))
    await world.image(
        "deleted-child",
        job="free-old",
        parents=("upload-parent-of-deleted",),
        deleted=timedelta(0),
    )
    await world.image("live-favorite", job="free-old", favorite=True)
    await world.job(
        "queued",
        state="queued",
        ended=31 * DAY,
        spec={
            "sources": [{"image_id": world.images["upload-queued-source"].id, "storage_key": "x"}],
            "mask": {"image_id": world.images["upload-queued-mask"].id, "storage_key": "y"},
        },
    )


KEPT = {
    "deleted-recent",
    "deleted-pro",
    "bob-kept",
    "upload-favorite",
    "upload-tagged",
    "upload-recent",
    "upload-parent-of-live",
    "upload-queued-source",
    "upload-queued-mask",
    "live",
    "live-favorite",
}
PURGED = {
    "deleted-old",
    "bob-deleted",
    "deleted-child",
    "upload-unkept",
    "upload-parent-of-deleted",
}


async def event_types(pool: asyncpg.Pool, job_id: str) -> list[tuple[int, str]]:
    rows = await pool.fetch(
        "SELECT sequence, event_type FROM generation_events WHERE generation_id = $1 "
        "ORDER BY sequence",
        uuid.UUID(job_id),
    )
    return [(r["sequence"], r["event_type"]) for r in rows]


async def test_the_reaper_purges_what_the_plans_say_and_nothing_else(
    pool: asyncpg.Pool, store: BlobStore
) -> None:
    base = await pool.fetchval("SELECT now()")
    world = World(pool, store, base)
    await build(world)
    assert await world.alive() == KEPT | PURGED
    before = {name: await event_types(pool, job) for name, job in world.jobs.items()}

    # Not yet: a day before the first period ends nothing goes (blobs are young, so the
    # orphan sweep has nothing either).
    early = await service(world, Clock(base + 29 * DAY)).run_pass(sweep=False)
    assert early is not None
    # (Event logs of free jobs that ended 29 days ago are past their 7 days already.)
    assert (early.deleted_images.count, early.uploads.count, early.event_logs) == (0, 0, 2)
    assert await world.alive() == KEPT | PURGED

    report = await service(world, Clock(base + 31 * DAY)).run_pass()
    assert report is not None and not report.dry_run
    assert await world.alive() == KEPT
    assert await world.blobs() == KEPT, "blobs go with their rows, and only theirs"
    assert (report.deleted_images.count, report.uploads.count) == (3, 2)
    assert report.deleted_images.bytes == 100 + 333 + 100
    assert report.uploads.bytes == 1000 + 100
    assert report.blobs.count == 5 and report.blobs_pending == 0
    assert await pool.fetchval("SELECT count(*) FROM blob_deletions") == 0
    await world.assert_storage_exact()
    bob = await pool.fetchval("SELECT used_bytes FROM storage_usage WHERE user_id = 'bob'")
    assert bob == 444

    # Event logs: the free jobs that ended over 7 days ago are compacted (at day 29);
    # the recent, the pro (kept forever) and the running job keep every event.
    assert await event_types(pool, world.jobs["free-old"]) == [
        (1, "queued"),
        (5, "image_ready"),
        (7, "image_ready"),
        (8, "completed"),
    ]
    assert await event_types(pool, world.jobs["bob-job"]) == [(1, "queued"), (3, "cancelled")]
    for name in ("free-recent", "pro-old", "running", "queued"):
        assert await event_types(pool, world.jobs[name]) == before[name], name
    compacted = await pool.fetch(
        "SELECT id, first_sequence, last_sequence FROM generations "
        "WHERE events_compacted_at IS NOT NULL"
    )
    assert {str(r["id"]) for r in compacted} == {world.jobs["free-old"], world.jobs["bob-job"]}
    assert {(r["first_sequence"], r["last_sequence"]) for r in compacted} == {(1, 8), (1, 3)}

    # Nothing more is due: a second pass removes nothing, and reads only what may be due.
    again = await service(world, Clock(base + 31 * DAY)).run_pass()
    assert again is not None
    assert (again.deleted_images.count, again.uploads.count, again.event_logs) == (0, 0, 0)
    assert await world.alive() == KEPT

    # Later, each goes when its own period ends.
    later = await service(world, Clock(base + 91 * DAY)).run_pass()
    assert later is not None
    assert await world.alive() == KEPT - {"deleted-recent", "deleted-pro", "upload-recent"}
    await world.assert_storage_exact()


class FlakyDeletes:
    """A blob store whose deletes fail as told: StorageFailed (the store is down), or a
    crash (the process stops between the row's delete and the blob's)."""

    def __init__(self, inner: BlobStore, *, fail: int = 0, crash: bool = False) -> None:
        self._inner = inner
        self.failures_left = fail
        self.crash = crash
        self.bucket = inner.bucket

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self._inner.put(key, data, content_type)

    async def get(self, key: str) -> bytes:
        return await self._inner.get(key)

    async def exists(self, key: str) -> bool:
        return await self._inner.exists(key)

    async def signed_url(self, key: str, ttl: timedelta) -> str:
        return await self._inner.signed_url(key, ttl)

    def list_keys(self, prefix: str) -> AsyncIterator[BlobEntry]:
        return self._inner.list_keys(prefix)

    async def delete(self, key: str) -> None:
        if self.crash:
            raise Crash
        if self.failures_left:
            self.failures_left -= 1
            raise StorageFailed("the store is down")
        await self._inner.delete(key)

    async def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        if self.crash:
            raise Crash
        failed = {key: "the store is down" for key in keys[: self.failures_left]}
        self.failures_left -= len(failed)
        return failed | await self._inner.delete_many([k for k in keys if k not in failed])


class Crash(BaseException):
    """The process stops here (nothing after it runs, not even `except Exception`)."""


async def test_a_failed_or_crashed_blob_delete_is_finished_by_the_next_pass(
    pool: asyncpg.Pool, store: BlobStore
) -> None:
    base = await pool.fetchval("SELECT now()")
    world = World(pool, store, base)
    await world.job("job")
    for n in range(4):
        await world.image(f"deleted-{n}", job="job", deleted=timedelta(0))
    clock = Clock(base + 31 * DAY)

    # The store fails one delete: the rows are gone, that blob stays queued.
    flaky = FlakyDeletes(store, fail=1)
    report = await service(world, clock, flaky).run_pass(sweep=False)
    assert report is not None and report.blobs_pending == 1
    assert await world.alive() == set()
    assert len(await world.blobs()) == 1
    [queued] = await pool.fetch("SELECT storage_key, attempts, last_error FROM blob_deletions")
    assert queued["attempts"] == 1 and "down" in queued["last_error"]
    await world.assert_storage_exact()

    # The next pass finishes it.
    report = await service(world, clock).run_pass(sweep=False)
    assert report is not None and (report.blobs.count, report.blobs_pending) == (1, 0)
    assert await world.blobs() == set()
    assert await pool.fetchval("SELECT count(*) FROM blob_deletions") == 0

    # A crash right after the rows' delete committed: every blob stays, all queued.
    for n in range(4, 7):
        await world.image(f"deleted-{n}", job="job", deleted=timedelta(0))
    with pytest.raises(Crash):
        await service(world, clock, FlakyDeletes(store, crash=True)).run_pass(sweep=False)
    assert await world.alive() == set(), "the rows' removal committed before any blob delete"
    assert len(await world.blobs()) == 3
    assert await pool.fetchval("SELECT count(*) FROM blob_deletions") == 3
    await world.assert_storage_exact()
    # The crashed pass left no lock behind.
    held = await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert held == 0

    # The next pass (another replica, say) deletes them all and forgets them.
    report = await service(world, clock).run_pass(sweep=False)
    assert report is not None and report.blobs.count == 3 and report.blobs_pending == 0
    assert await world.blobs() == set()
    assert await pool.fetchval("SELECT count(*) FROM blob_deletions") == 0
    await world.assert_storage_exact()


async def test_the_orphan_sweep_deletes_old_unreferenced_blobs_only(
    pool: asyncpg.Pool, store: BlobStore
) -> None:
    base = await pool.fetchval("SELECT now()")
    world = World(pool, store, base)
    await world.job("job")
    await world.image("kept", job="job")
    await world.image("kept-upload", job="job", upload=True)
    now = datetime.now(UTC)
    # A blob put whose row never committed (a crash between the two), and one whose row
    # is about to: the sweep cannot tell them apart but by age.
    orphan = blob_key("alice", str(uuid.uuid4()), "png", now)
    orphan_source = source_key("carol", "webp", now)
    # An edit source stored before uploads were library images, named by a job's spec.
    legacy = source_key("dave", "png", now)
    # Not an image blob at all: the sweep never looks outside the image folders.
    elsewhere = "exports/report.csv"
    for key in (orphan, orphan_source, legacy, elsewhere):
        await store.put(key, b"x" * 10, "application/octet-stream")
    await pool.execute(
        "INSERT INTO retained_blob_keys (storage_key, reason) VALUES ($1, 'legacy')", legacy
    )

    async def keys() -> set[str]:
        return {entry.key async for entry in store.list_keys("")}

    everything = await keys()
    # Within the grace period nothing goes.
    young = await service(world, Clock(now + timedelta(minutes=30))).run_pass()
    assert young is not None and young.swept and young.orphan_blobs.count == 0
    assert await keys() == everything
    # The sweep ran: it is not due again for a day, whatever the age of the orphans.
    skipped = await service(world, Clock(now + timedelta(hours=2))).run_pass()
    assert skipped is not None and not skipped.swept
    assert await keys() == everything

    dry = await service(world, Clock(now + timedelta(days=2))).run_pass(dry_run=True)
    assert dry is not None and dry.orphan_blobs.count == 2 and dry.orphan_blobs.bytes == 20
    assert await keys() == everything
    swept = await service(world, Clock(now + timedelta(days=2))).run_pass()
    assert swept is not None and swept.swept
    assert (swept.orphan_blobs.count, swept.orphan_blobs.bytes) == (2, 20)
    assert await keys() == everything - {orphan, orphan_source}
    assert await world.blobs() == {"kept", "kept-upload"}


async def test_one_pass_at_a_time(pool: asyncpg.Pool, store: BlobStore) -> None:
    base = await pool.fetchval("SELECT now()")
    world = World(pool, store, base)
    await world.job("job")
    await world.image("deleted", job="job", deleted=timedelta(0))
    async with pool.acquire() as other_replica:
        await other_replica.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)
        busy = await service(world, Clock(base + 31 * DAY)).run_pass()
        assert busy is None
        assert await world.alive() == {"deleted"}
        # A dry run only reads: it needs no lock.
        dry = await service(world, Clock(base + 31 * DAY)).run_pass(dry_run=True)
        assert dry is not None and dry.deleted_images.count == 1
        await other_replica.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    done = await service(world, Clock(base + 31 * DAY)).run_pass()
    assert done is not None and done.deleted_images.count == 1


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[Any]]:
    tables = {
        "images": "SELECT * FROM images ORDER BY id",
        "image_parents": "SELECT * FROM image_parents ORDER BY image_id, parent_id",
        "generations": "SELECT * FROM generations ORDER BY id",
        "generation_events": "SELECT * FROM generation_events ORDER BY generation_id, sequence",
        "blob_deletions": "SELECT * FROM blob_deletions ORDER BY storage_key",
        "retention_runs": "SELECT * FROM retention_runs ORDER BY task",
        "storage_usage": "SELECT * FROM storage_usage ORDER BY user_id",
    }
    return {name: [dict(r) for r in await pool.fetch(sql)] for name, sql in tables.items()}


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGEN_", "DATABASE"))}
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_gc_dry_run_changes_nothing_and_gc_removes_it(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    store = LocalBlobStore(data_dir / "blobs", "http://127.0.0.1:1", b"k" * 32)
    # The CLI runs on the real clock: the rows are made old instead.
    base = await pool.fetchval("SELECT now()") - 40 * DAY
    world = World(pool, store, base)
    await build(world)
    orphan = blob_key("alice", str(uuid.uuid4()), "png", datetime.now(UTC))
    await store.put(orphan, b"o" * 50, "image/png")
    old = (datetime.now(UTC) - DAY).timestamp()
    os.utime(store.file_for_serving(orphan), (old, old))
    plans = tmp_path / "plans.json"
    plans.write_text(
        json.dumps(
            {
                "plans": {
                    "free": {},
                    "pro": {"deleted_image_retention_days": 90, "event_log_retention_days": None},
                }
            }
        )
    )
    env = {
        "DATABASE_URL": database_url,
        "IMAGEGEN_DATA_DIR": str(data_dir),
        "IMAGEGEN_PLANS_FILE": str(plans),
    }
    before = await snapshot(pool)
    blobs_before = {e.key async for e in store.list_keys("")}

    dry = await asyncio.to_thread(run_cli, ["gc", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would remove (dry run, nothing changed):")
    assert "soft-deleted images    3 rows" in dry.stdout
    assert "uploads nothing keeps  2 rows" in dry.stdout
    assert "orphaned blobs         1 blobs" in dry.stdout
    # free-old drops STARTED and three PROGRESS; free-recent and bob-job one PROGRESS each.
    assert "6 events of 3 jobs" in dry.stdout
    assert await snapshot(pool) == before, "a dry run changes no row"
    assert {e.key async for e in store.list_keys("")} == blobs_before, "nor any blob"

    done = await asyncio.to_thread(run_cli, ["gc"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed:")
    assert "soft-deleted images    3 rows" in done.stdout
    assert "6 events of 3 jobs" in done.stdout
    assert await world.alive() == KEPT
    assert orphan not in {e.key async for e in store.list_keys("")}
    await world.assert_storage_exact()

    # A replica's reaper holding the lock: the CLI says so and changes nothing.
    async with pool.acquire() as reaper:
        await reaper.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)
        busy = await asyncio.to_thread(run_cli, ["gc"], env)
        await reaper.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    assert busy.returncode == 3 and "running a retention pass" in busy.stderr


def metadata(user: str = "alice") -> tuple[tuple[str, str], ...]:
    from imagegen.identity import mint_token

    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user)}"),)


async def test_a_compacted_job_replays_from_its_first_kept_event(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool
) -> None:
    async with serve_in_process(
        tmp_path, database_url, env={"IMAGEGEN_GC_INTERVAL": "0"}
    ) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
            spec = common_pb2.GenerationSpec(
                prompt="a compacted fox", size=common_pb2.ImageSize(width=256, height=256), count=2
            )
            full = [
                r.event
                async for r in stub.GenerateImage(
                    generation_pb2.GenerateImageRequest(spec=spec), metadata=metadata()
                )
            ]
            name = full[-1].generation
            assert full[-1].type == generation_pb2.GENERATION_EVENT_TYPE_COMPLETED
            job = (
                await stub.GetGeneration(
                    generation_pb2.GetGenerationRequest(name=name), metadata=metadata()
                )
            ).generation
            assert job.first_sequence == 1 and job.last_sequence == full[-1].sequence

            store = LocalBlobStore(tmp_path / "data" / "blobs", "http://127.0.0.1:1", b"k" * 32)
            world = World(pool, store, datetime.now(UTC))
            report = await service(world, Clock(datetime.now(UTC) + 8 * DAY)).run_pass(sweep=False)
            assert report is not None and report.event_logs == 1
            assert report.events.count == len(full) - 4

            kept = {
                generation_pb2.GENERATION_EVENT_TYPE_QUEUED,
                generation_pb2.GENERATION_EVENT_TYPE_IMAGE_READY,
                generation_pb2.GENERATION_EVENT_TYPE_COMPLETED,
            }
            expected = [(e.sequence, e.type) for e in full if e.type in kept]
            assert len(expected) == 4

            async def replay(after: int) -> list[generation_pb2.GenerationEvent]:
                return [
                    r.event
                    async for r in stub.WatchGeneration(
                        generation_pb2.WatchGenerationRequest(name=name, after_sequence=after),
                        metadata=metadata(),
                        timeout=30,
                    )
                ]

            replayed = await replay(0)
            assert [(e.sequence, e.type) for e in replayed] == expected
            # The images are whole, with fresh URLs; the sequence numbers are the same.
            ready = [
                e for e in replayed if e.type == generation_pb2.GENERATION_EVENT_TYPE_IMAGE_READY
            ]
            assert len(ready) == 2 and all(e.image.uri for e in ready)
            middle = expected[1][0]
            assert [(e.sequence, e.type) for e in await replay(middle)] == expected[2:]
            job = (
                await stub.GetGeneration(
                    generation_pb2.GetGenerationRequest(name=name), metadata=metadata()
                )
            ).generation
            assert (job.first_sequence, job.last_sequence) == (1, full[-1].sequence)
            assert len(job.images) == 2


@pytest.mark.parametrize(
    ("kind", "index"),
    [
        (RetentionKind.DELETED_IMAGES, "images_deleted_retention_idx"),
        (RetentionKind.UPLOADS, "images_upload_retention_idx"),
        (RetentionKind.EVENT_LOGS, "generations_events_retention_idx"),
    ],
)
async def test_each_walk_reads_its_index(
    pool: asyncpg.Pool, kind: RetentionKind, index: str
) -> None:
    # The planner's choice on a near-empty table says little; with sequential scans
    # priced out, a walk that its index can serve uses it.
    captured: list[str] = []

    class Explaining:
        async def fetch(self, statement: str, *args: Any) -> list[Any]:
            captured.append(statement)
            return []

    repository = RetentionRepository(Explaining())  # type: ignore[arg-type]
    await repository.candidates(kind, datetime.now(UTC), None, 10)
    [statement] = captured
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + statement,
            datetime.now(UTC),
            datetime(1, 1, 1, tzinfo=UTC),
            uuid.UUID(int=0),
            10,
        )
    assert index in json.dumps(plan), plan


async def test_every_replica_runs_the_reaper_until_it_stops(
    tmp_path: Path, database_url: str, pool: asyncpg.Pool
) -> None:
    plans = json.loads(UNLIMITED_PLANS.read_text())
    for limits in plans["plans"].values():
        limits["deleted_image_retention_days"] = 0  # purged at the next pass
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(plans))
    env = {"IMAGEGEN_PLANS_FILE": str(plans_file), "IMAGEGEN_GC_INTERVAL": "0.2"}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
            spec = common_pb2.GenerationSpec(
                prompt="a short-lived fox", size=common_pb2.ImageSize(width=256, height=256)
            )
            events = [
                r.event
                async for r in stub.GenerateImage(
                    generation_pb2.GenerateImageRequest(spec=spec), metadata=metadata()
                )
            ]
            [image] = [e.image for e in events if e.image.name]
            library = library_pb2_grpc.ImageLibraryServiceStub(channel)
            await library.DeleteImage(
                library_pb2.DeleteImageRequest(name=image.name), metadata=metadata()
            )
            image_id = uuid.UUID(image.name.removeprefix("images/"))
            # Waiting for the state the reaper makes (a pass every 0.2 s), within a limit.
            async with asyncio.timeout(30):
                while await pool.fetchval("SELECT count(*) FROM images WHERE id = $1", image_id):
                    await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await library.GetImage(
                    library_pb2.GetImageRequest(name=image.name), metadata=metadata()
                )
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert await pool.fetchval("SELECT count(*) FROM blob_deletions") == 0
    assert not [p for p in (tmp_path / "data" / "blobs").rglob("*.png")]
