"""Retention and cleanup: one reaper pass, and the reaper that runs one every interval in
each replica (one replica at a time, under a PostgreSQL advisory lock).

A pass, in order:
1. Blobs queued for deletion by earlier passes that did not finish (a crash, a store
   that failed) are deleted, then their entries.
2. Soft-deleted images past their plan's period, then uploads that nothing keeps past
   theirs, are purged in batches: each batch deletes its rows and queues their blobs in
   one transaction (the per-user storage counter follows the rows by trigger), then
   deletes the blobs, then their queue entries. A crash anywhere leaves either the row
   and its blob, or a queue entry that the next pass finishes: never a row without its
   blob, never a blob that nobody will delete.
3. Finished jobs' event logs past their plan's period are compacted to their QUEUED,
   IMAGE_READY and terminal events.
4. Once per sweep interval (across replicas): the orphan sweep lists the image folders of
   the blob store and deletes blobs that no row names and that are older than the grace
   period (a blob put just before its row commits is younger than that). Orphans come
   from crashes between a blob's put and its row's insert.

Which rows are due is domain/retention.py's rule; `imagegen gc [--dry-run]` runs one pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from imagegen.domain.plans import PlanTable
from imagegen.domain.retention import RetentionKind, RetentionRules
from imagegen.repositories.retention import Candidate, RemovedBlob, RetentionRepository
from imagegen.storage.base import BlobStore

log = logging.getLogger(__name__)

#: The folders of the blob store that hold image blobs (storage/keys.py); the sweep
#: never looks elsewhere.
IMAGE_PREFIXES = ("generated/", "sources/")
SWEEP_TASK = "orphan_sweep"


def utc_now() -> datetime:
    """The real clock (tests inject another)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class RetentionSettings:
    """How a pass runs."""

    #: rows per batch (each batch is one transaction), blobs per listing check
    batch_size: int = 500
    #: a blob no row names is an orphan only once older than this
    orphan_grace: timedelta = timedelta(hours=1)
    #: how often the orphan sweep runs (it lists every image blob)
    sweep_interval: timedelta = timedelta(days=1)


@dataclass
class Totals:
    """How many things of one kind, and their bytes."""

    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        """One more thing of `size` bytes."""
        self.count += 1
        self.bytes += size


@dataclass
class GcReport:
    """What a pass removed, or (dry run) would remove."""

    dry_run: bool
    #: image rows purged after their soft-deletion period
    deleted_images: Totals = field(default_factory=Totals)
    #: uploads purged once nothing kept them
    uploads: Totals = field(default_factory=Totals)
    #: jobs whose event logs were compacted
    event_logs: int = 0
    #: events removed from those logs (bytes: their payloads and previews)
    events: Totals = field(default_factory=Totals)
    #: blobs of purged rows deleted from the store (this pass's and earlier ones')
    blobs: Totals = field(default_factory=Totals)
    #: blobs still queued for deletion after a failed attempt
    blobs_pending: int = 0
    #: whether the orphan sweep ran
    swept: bool = False
    #: blobs no row names, older than the grace period, deleted by the sweep
    orphan_blobs: Totals = field(default_factory=Totals)

    def lines(self) -> list[str]:
        """The report as `imagegen gc` prints it: counts and bytes by kind."""
        rows = [
            ("soft-deleted images", f"{self.deleted_images.count} rows", self.deleted_images),
            ("uploads nothing keeps", f"{self.uploads.count} rows", self.uploads),
            (
                "event log entries",
                f"{self.events.count} events of {self.event_logs} jobs",
                self.events,
            ),
            ("blobs of purged rows", f"{self.blobs.count} blobs", self.blobs),
        ]
        if self.swept:
            rows.append(("orphaned blobs", f"{self.orphan_blobs.count} blobs", self.orphan_blobs))
        lines = ["would remove (dry run, nothing changed):" if self.dry_run else "removed:"]
        lines += [
            f"  {kind:<22} {amount:<26} {totals.bytes:>15,} bytes" for kind, amount, totals in rows
        ]
        if not self.swept:
            lines.append("  orphaned blobs         (the sweep was not due this pass)")
        if self.blobs_pending:
            lines.append(
                f"  {self.blobs_pending} blob deletion(s) failed and stay queued for the next pass"
            )
        return lines


class RetentionService:
    """One reaper pass (see the module docstring)."""

    def __init__(
        self,
        repository: RetentionRepository,
        blobs: BlobStore,
        plans: PlanTable,
        settings: RetentionSettings,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._repository = repository
        self._blobs = blobs
        self._rules = RetentionRules(plans)
        self._settings = settings
        self._clock = clock

    async def run_pass(
        self, *, dry_run: bool = False, sweep: bool | None = None
    ) -> GcReport | None:
        """One pass at the clock's now. A dry run changes nothing (no lock needed: it
        only reads). `sweep` forces the orphan sweep on or off; None runs it when its
        interval has passed. None when another replica is running a pass."""
        now = self._clock()
        report = GcReport(dry_run=dry_run)
        if dry_run:
            await self._pass(report, now, sweep=True if sweep is None else sweep)
            return report
        async with self._repository.exclusive() as acquired:
            if not acquired:
                return None
            if sweep is None:
                last = await self._repository.last_finished(SWEEP_TASK)
                sweep = last is None or now - last >= self._settings.sweep_interval
            await self._pass(report, now, sweep=sweep)
        removed = (
            report.deleted_images.count
            + report.uploads.count
            + report.event_logs
            + report.blobs.count
            + report.blobs_pending
            + report.orphan_blobs.count
        )
        # Every few minutes in every deployment: worth a line only when it did something.
        log.log(
            logging.INFO if removed else logging.DEBUG,
            "retention pass finished",
            extra={
                "event": "retention.pass",
                "deleted_images": report.deleted_images.count,
                "uploads": report.uploads.count,
                "event_logs": report.event_logs,
                "events": report.events.count,
                "blobs": report.blobs.count,
                "blobs_pending": report.blobs_pending,
                "orphan_blobs": report.orphan_blobs.count,
            },
        )
        return report

    async def _pass(self, report: GcReport, now: datetime, *, sweep: bool) -> None:
        await self._drain_queue(report)
        await self._purge(RetentionKind.DELETED_IMAGES, report.deleted_images, report, now)
        await self._purge(RetentionKind.UPLOADS, report.uploads, report, now)
        await self._compact(report, now)
        if sweep:
            await self._sweep(report, now)
            report.swept = True

    # --- steps --------------------------------------------------------------------------

    async def _walk(self, kind: RetentionKind, now: datetime) -> AsyncIterator[list[Candidate]]:
        """Batches of candidates of `kind`: rows looked at longer ago than the shortest
        period of any plan. Nothing when every plan keeps such rows forever."""
        shortest = self._rules.shortest(kind)
        if shortest is None:
            return
        after: Candidate | None = None
        while True:
            batch = await self._repository.candidates(
                kind, now - shortest, after, self._settings.batch_size
            )
            if not batch:
                return
            yield batch
            after = batch[-1]

    def _sort(
        self, kind: RetentionKind, batch: list[Candidate], now: datetime
    ) -> tuple[list[tuple[str, datetime]], list[tuple[str, datetime]]]:
        """(due rows with their cutoff, rows to look at again later with when)."""
        due: list[tuple[str, datetime]] = []
        later: list[tuple[str, datetime]] = []
        for row in batch:
            verdict = self._rules.verdict(kind, row.plan, row.started, now)
            cutoff = self._rules.due_before(kind, row.plan, now)
            if verdict.due and cutoff is not None:
                due.append((row.id, cutoff))
            elif verdict.look_again_from is not None:
                later.append((row.id, verdict.look_again_from))
        return due, later

    async def _purge(
        self, kind: RetentionKind, totals: Totals, report: GcReport, now: datetime
    ) -> None:
        async for batch in self._walk(kind, now):
            due, later = self._sort(kind, batch, now)
            if report.dry_run:
                for removed in await self._repository.would_purge_images(kind, due):
                    totals.add(removed.size_bytes)
                    report.blobs.add(removed.size_bytes)
                continue
            purged = await self._repository.purge_images(kind, due, now)
            for removed in purged:
                totals.add(removed.size_bytes)
            # Due but kept after all (favourite, tagged, used meanwhile, or an upload a
            # live image was made from): looked at again one shortest period from now.
            gone = {removed.image_id for removed in purged}
            later += [(row_id, now) for row_id, _ in due if row_id not in gone]
            await self._repository.look_again(kind, later)
            await self._delete_blobs(purged, report)

    async def _delete_blobs(self, purged: list[RemovedBlob], report: GcReport) -> None:
        """Delete the blobs of rows whose removal has committed, then their entries."""
        if not purged:
            return
        # One request per thousand blobs (S3 DeleteObjects), not one per blob. Stopped
        # during it, nothing is forgotten: the next pass deletes them again (a missing
        # blob is no error).
        failures = await self._blobs.delete_many([removed.storage_key for removed in purged])
        deleted: list[str] = []
        try:
            for removed in purged:
                error = failures.get(removed.storage_key)
                if error is not None:
                    report.blobs_pending += 1
                    await self._repository.deletion_failed(removed.storage_key, error)
                    log.warning(
                        "deleting a purged image's blob failed; the next pass retries",
                        extra={"event": "retention.blob_delete_failed", "error": error},
                    )
                    continue
                deleted.append(removed.storage_key)
                report.blobs.add(removed.size_bytes)
        finally:
            # Also when the pass is stopped half-way: what is deleted is forgotten.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._repository.deletions_done(deleted))

    async def _drain_queue(self, report: GcReport) -> None:
        """Finish the blob deletions earlier passes queued but did not complete."""
        after = ""
        while True:
            pending = await self._repository.pending_deletions(after, self._settings.batch_size)
            if not pending:
                return
            after = pending[-1].storage_key
            if report.dry_run:
                for entry in pending:
                    if not entry.referenced:
                        report.blobs.add(entry.size_bytes)
                continue
            referenced = [entry.storage_key for entry in pending if entry.referenced]
            await self._repository.deletions_done(referenced)
            await self._delete_blobs(
                [
                    RemovedBlob("", "", entry.storage_key, entry.size_bytes)
                    for entry in pending
                    if not entry.referenced
                ],
                report,
            )

    async def _compact(self, report: GcReport, now: datetime) -> None:
        kind = RetentionKind.EVENT_LOGS
        async for batch in self._walk(kind, now):
            due, later = self._sort(kind, batch, now)
            if report.dry_run:
                compaction = await self._repository.would_compact_event_logs(due)
            else:
                compaction = await self._repository.compact_event_logs(due, now)
                await self._repository.look_again(kind, later)
            report.event_logs += compaction.jobs
            report.events.count += compaction.events
            report.events.bytes += compaction.bytes

    async def _sweep(self, report: GcReport, now: datetime) -> None:
        """Delete image blobs that no row names, older than the grace period."""
        older_than = now - self._settings.orphan_grace
        for prefix in IMAGE_PREFIXES:
            page: dict[str, int] = {}
            async for entry in self._blobs.list_keys(prefix):
                if entry.modified_at < older_than:
                    page[entry.key] = entry.size_bytes
                if len(page) >= self._settings.batch_size:
                    await self._sweep_page(page, report)
                    page = {}
            await self._sweep_page(page, report)
        if not report.dry_run:
            await self._repository.record_finished(SWEEP_TASK, now)

    async def _sweep_page(self, page: dict[str, int], report: GcReport) -> None:
        orphans = sorted(await self._repository.unreferenced(list(page)))
        failures = {} if report.dry_run or not orphans else await self._blobs.delete_many(orphans)
        for key in orphans:
            error = failures.get(key)
            if error is not None:
                # Still an orphan next time: the next sweep tries again.
                log.warning(
                    "deleting an orphaned blob failed",
                    extra={"event": "retention.orphan_delete_failed", "error": error},
                )
                continue
            report.orphan_blobs.add(page[key])


class Reaper:
    """Runs a retention pass every `interval` in the background, from `start()` until
    `stop()`. Every replica runs one; the advisory lock lets one pass run at a time."""

    def __init__(self, service: RetentionService, interval: timedelta) -> None:
        self._service = service
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Start the loop; the first pass runs one interval after the start."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retention-reaper")

    async def stop(self) -> None:
        """Stop the loop, abandoning a pass in progress between two of its steps (what a
        committed step removed stays removed; its blobs are finished next pass)."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval.total_seconds())
            if self._stopping.is_set():
                return
            try:
                await self._service.run_pass()
            except Exception:
                # A database or store outage: logged, and the next interval tries again.
                log.exception("retention pass failed", extra={"event": "retention.failed"})
