"""What the reaper reads and removes (SQL lives here only): candidates by their "look
again" time, purges of image rows that queue their blobs for deletion in the same
transaction, event-log compaction, the queue of blobs to delete, and the orphan check.

Every candidate query walks one of the indexes of migrations/0010_retention.sql in
order of `greatest(<last look>, <clock start>)` and id, from a cursor, so a pass reads
each row at most once and never a whole table.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from imagegen.domain.models import EventType
from imagegen.domain.retention import RetentionKind

#: The advisory lock one reaper pass holds (one replica at a time): b"imgreapr" as a bigint.
RETENTION_LOCK_KEY = 0x696D677265617072

#: Events a compacted log keeps: the job's start in the queue, its images, its end.
KEPT_EVENTS = (
    EventType.QUEUED,
    EventType.IMAGE_READY,
    EventType.COMPLETED,
    EventType.FAILED,
    EventType.CANCELLED,
)

#: Before every look time: where a walk over candidates starts.
_START = (datetime(1, 1, 1, tzinfo=UTC), uuid.UUID(int=0))


@dataclass(frozen=True)
class Candidate:
    """A row that may be due: its id, the plan its job was submitted under ('' when
    unknown), when its clock started, and its place in the walk (`look`, id)."""

    id: str
    plan: str
    started: datetime
    look: datetime


@dataclass(frozen=True)
class RemovedBlob:
    """The blob of an image row that was (or, in a dry run, would be) purged."""

    image_id: str
    user_id: str
    storage_key: str
    size_bytes: int


@dataclass(frozen=True)
class PendingDeletion:
    """A blob whose row is gone, waiting to be deleted from the store."""

    storage_key: str
    size_bytes: int
    attempts: int
    #: an image row names the key again (never expected): the entry is dropped, the
    #: blob kept
    referenced: bool


@dataclass(frozen=True)
class Compaction:
    """What compacting event logs removed (or would remove)."""

    jobs: int
    events: int
    bytes: int


# The conditions under which an image row may go, rechecked in the statement that
# removes it (the owner may have undeleted, tagged or used it since it was read).
# `due.started_before` is the row's own cutoff (its plan's period before now).
_STILL_DUE = {
    RetentionKind.DELETED_IMAGES: """
        i.deleted_at IS NOT NULL AND i.deleted_at <= due.started_before
    """,
    RetentionKind.UPLOADS: """
        i.upload AND i.deleted_at IS NULL AND NOT i.favorite AND i.tags = '{}'
        AND i.created_at <= due.started_before
        -- no live image was made from it
        AND NOT EXISTS (
            SELECT 1 FROM image_parents p JOIN images c ON c.id = p.image_id
             WHERE p.parent_id = i.id AND c.deleted_at IS NULL)
        -- no unfinished job of its owner uses it as a source or mask
        AND NOT EXISTS (
            SELECT 1 FROM generations g
             WHERE g.user_id = i.user_id AND g.state IN ('queued', 'running')
               AND (g.spec -> 'sources' @> jsonb_build_array(
                        jsonb_build_object('image_id', i.id::text))
                    OR g.spec -> 'mask' ->> 'image_id' = i.id::text))
    """,
}

_LOOK = {
    RetentionKind.DELETED_IMAGES: "greatest(i.retention_checked_at, i.deleted_at)",
    RetentionKind.UPLOADS: "greatest(i.retention_checked_at, i.created_at)",
}
_STARTED = {
    RetentionKind.DELETED_IMAGES: "i.deleted_at",
    RetentionKind.UPLOADS: "i.created_at",
}
# The predicates of images_deleted_retention_idx and images_upload_retention_idx.
_INDEXED = {
    RetentionKind.DELETED_IMAGES: "i.deleted_at IS NOT NULL",
    RetentionKind.UPLOADS: (
        "i.upload AND i.deleted_at IS NULL AND NOT i.favorite AND i.tags = '{}'"
    ),
}

_JOB_ENDED = "coalesce(g.completed_at, g.updated_at)"
_JOB_LOOK = f"greatest(g.events_checked_at, {_JOB_ENDED})"
# The predicate of generations_events_retention_idx.
_JOB_INDEXED = "g.events_compacted_at IS NULL AND g.state IN ('completed', 'failed', 'cancelled')"


def _image_candidates_sql(kind: RetentionKind) -> str:
    look, started, indexed = _LOOK[kind], _STARTED[kind], _INDEXED[kind]
    return f"""
        SELECT i.id, {look} AS look, {started} AS started,
               coalesce(g.spec ->> 'plan', '') AS plan
          FROM images i LEFT JOIN generations g ON g.id = i.generation_id
         WHERE {indexed}
           AND {look} < $1
           AND ({look}, i.id) > ($2::timestamptz, $3::uuid)
         ORDER BY {look}, i.id
         LIMIT $4
    """  # noqa: S608 - built from this module's constants; every value is a parameter


_DUE = "due(id, started_before) AS (SELECT * FROM unnest($1::uuid[], $2::timestamptz[]))"


def _purge_sql(kind: RetentionKind) -> str:
    return f"""
        WITH {_DUE},
        purged AS (
            DELETE FROM images i USING due
             WHERE i.id = due.id AND {_STILL_DUE[kind]}
            RETURNING i.id, i.user_id, i.storage_key, i.size_bytes
        ),
        queued AS (
            INSERT INTO blob_deletions (storage_key, user_id, size_bytes, reason, queued_at)
            SELECT storage_key, user_id, size_bytes, $3, $4 FROM purged
            ON CONFLICT (storage_key) DO NOTHING
        )
        SELECT id, user_id, storage_key, size_bytes FROM purged
    """  # noqa: S608 - built from this module's constants; every value is a parameter


def _would_purge_sql(kind: RetentionKind) -> str:
    return f"""
        WITH {_DUE}
        SELECT i.id, i.user_id, i.storage_key, i.size_bytes
          FROM images i JOIN due ON i.id = due.id
         WHERE {_STILL_DUE[kind]}
    """  # noqa: S608 - built from this module's constants; every value is a parameter


_DUE_JOBS = f"""
    SELECT g.id FROM generations g
      JOIN unnest($1::uuid[], $2::timestamptz[]) AS due(id, ended_before) ON g.id = due.id
     WHERE {_JOB_INDEXED} AND {_JOB_ENDED} <= due.ended_before
"""  # noqa: S608 - built from this module's constants


def _removed(row: asyncpg.Record) -> RemovedBlob:
    return RemovedBlob(str(row["id"]), row["user_id"], row["storage_key"], int(row["size_bytes"]))


class RetentionRepository:
    """The reaper's statements; each removal is one transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        """Hold the reaper's advisory lock for the block, on a connection of its own;
        yields False (and holds nothing) when another process has it."""
        async with self._pool.acquire() as conn:
            acquired = bool(
                await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY)
            )
            try:
                yield acquired
            finally:
                if acquired:
                    try:
                        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
                    except BaseException:
                        # A session lock outlives a failed unlock (the pool does not reset
                        # connections): close the session so no reaper is locked out.
                        conn.terminate()
                        raise

    async def candidates(
        self,
        kind: RetentionKind,
        look_before: datetime,
        after: Candidate | None,
        limit: int,
    ) -> list[Candidate]:
        """Rows of `kind` whose look time is before `look_before`, after `after` in the
        walk, at most `limit`."""
        cursor = (after.look, uuid.UUID(after.id)) if after else _START
        if kind is RetentionKind.EVENT_LOGS:
            statement = f"""
                SELECT g.id, {_JOB_LOOK} AS look, {_JOB_ENDED} AS started,
                       coalesce(g.spec ->> 'plan', '') AS plan
                  FROM generations g
                 WHERE {_JOB_INDEXED}
                   AND {_JOB_LOOK} < $1
                   AND ({_JOB_LOOK}, g.id) > ($2::timestamptz, $3::uuid)
                 ORDER BY {_JOB_LOOK}, g.id
                 LIMIT $4
            """  # noqa: S608 - built from this module's constants
        else:
            statement = _image_candidates_sql(kind)
        rows = await self._pool.fetch(statement, look_before, *cursor, limit)
        return [Candidate(str(r["id"]), str(r["plan"]), r["started"], r["look"]) for r in rows]

    async def look_again(self, kind: RetentionKind, rows: Sequence[tuple[str, datetime]]) -> None:
        """Record when each (id, look-again-from) row was found not due, so the walk
        passes it by until then."""
        if not rows:
            return
        ids = [uuid.UUID(row_id) for row_id, _ in rows]
        moments = [moment for _, moment in rows]
        if kind is RetentionKind.EVENT_LOGS:
            statement = """
                UPDATE generations g SET events_checked_at = looked.at
                  FROM unnest($1::uuid[], $2::timestamptz[]) AS looked(id, at)
                 WHERE g.id = looked.id
            """
        else:
            statement = """
                UPDATE images i SET retention_checked_at = looked.at
                  FROM unnest($1::uuid[], $2::timestamptz[]) AS looked(id, at)
                 WHERE i.id = looked.id
            """
        await self._pool.execute(statement, ids, moments)

    async def purge_images(
        self,
        kind: RetentionKind,
        due: Sequence[tuple[str, datetime]],
        now: datetime,
    ) -> list[RemovedBlob]:
        """Delete the (id, started-before) image rows that are still due, and queue their
        blobs for deletion, in one transaction (the storage counter follows the rows, by
        trigger). Returns what went."""
        if not due or kind is RetentionKind.EVENT_LOGS:
            return []
        rows = await self._pool.fetch(
            _purge_sql(kind),
            [uuid.UUID(row_id) for row_id, _ in due],
            [moment for _, moment in due],
            kind.value,
            now,
        )
        return [_removed(r) for r in rows]

    async def would_purge_images(
        self, kind: RetentionKind, due: Sequence[tuple[str, datetime]]
    ) -> list[RemovedBlob]:
        """What `purge_images` would delete, changing nothing."""
        if not due or kind is RetentionKind.EVENT_LOGS:
            return []
        rows = await self._pool.fetch(
            _would_purge_sql(kind),
            [uuid.UUID(row_id) for row_id, _ in due],
            [moment for _, moment in due],
        )
        return [_removed(r) for r in rows]

    async def compact_event_logs(
        self, due: Sequence[tuple[str, datetime]], now: datetime
    ) -> Compaction:
        """Compact the (id, ended-before) jobs that are still due, in one transaction: drop
        every event but the kept kinds and set each job's first_sequence to its oldest
        kept event."""
        if not due:
            return Compaction(0, 0, 0)
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                _DUE_JOBS + " FOR UPDATE OF g",
                [uuid.UUID(job_id) for job_id, _ in due],
                [moment for _, moment in due],
            )
            ids = [r["id"] for r in rows]
            if not ids:
                return Compaction(0, 0, 0)
            dropped = await conn.fetchrow(
                """
                WITH dropped AS (
                    DELETE FROM generation_events
                     WHERE generation_id = ANY($1::uuid[]) AND event_type <> ALL($2::text[])
                    RETURNING octet_length(payload::text)
                              + coalesce(octet_length(preview), 0) AS size
                )
                SELECT count(*) AS events, coalesce(sum(size), 0) AS bytes FROM dropped
                """,
                ids,
                [kind.value for kind in KEPT_EVENTS],
            )
            await conn.execute(
                """
                UPDATE generations g
                   SET events_compacted_at = $2,
                       first_sequence = coalesce(
                           (SELECT min(e.sequence) FROM generation_events e
                             WHERE e.generation_id = g.id),
                           g.last_sequence + 1)
                 WHERE g.id = ANY($1::uuid[])
                """,
                ids,
                now,
            )
        return Compaction(len(ids), int(dropped["events"]), int(dropped["bytes"]))

    async def would_compact_event_logs(self, due: Sequence[tuple[str, datetime]]) -> Compaction:
        """What `compact_event_logs` would remove, changing nothing."""
        if not due:
            return Compaction(0, 0, 0)
        row = await self._pool.fetchrow(
            f"""
            SELECT (SELECT count(*) FROM ({_DUE_JOBS}) AS jobs) AS jobs,
                   count(e.sequence) AS events,
                   coalesce(sum(octet_length(e.payload::text)
                                + coalesce(octet_length(e.preview), 0)), 0) AS bytes
              FROM generation_events e
             WHERE e.generation_id IN ({_DUE_JOBS}) AND e.event_type <> ALL($3::text[])
            """,  # noqa: S608 - built from this module's constants
            [uuid.UUID(job_id) for job_id, _ in due],
            [moment for _, moment in due],
            [kind.value for kind in KEPT_EVENTS],
        )
        return Compaction(int(row["jobs"]), int(row["events"]), int(row["bytes"]))

    async def pending_deletions(self, after_key: str, limit: int) -> list[PendingDeletion]:
        """Queued blob deletions after `after_key` (key order), at most `limit`."""
        rows = await self._pool.fetch(
            """
            SELECT d.storage_key, d.size_bytes, d.attempts,
                   EXISTS (SELECT 1 FROM images i WHERE i.storage_key = d.storage_key)
                       AS referenced
              FROM blob_deletions d
             WHERE d.storage_key > $1
             ORDER BY d.storage_key
             LIMIT $2
            """,
            after_key,
            limit,
        )
        return [
            PendingDeletion(
                r["storage_key"], int(r["size_bytes"]), int(r["attempts"]), bool(r["referenced"])
            )
            for r in rows
        ]

    async def deletions_done(self, keys: Sequence[str]) -> None:
        """Forget the queued deletions of these blobs (deleted, or named by a row again)."""
        if keys:
            await self._pool.execute(
                "DELETE FROM blob_deletions WHERE storage_key = ANY($1::text[])", list(keys)
            )

    async def deletion_failed(self, key: str, error: str) -> None:
        """Count a failed attempt to delete a queued blob; the next pass tries again."""
        await self._pool.execute(
            "UPDATE blob_deletions SET attempts = attempts + 1, last_error = $2 "
            "WHERE storage_key = $1",
            key,
            error[:500],
        )

    async def unreferenced(self, keys: Sequence[str]) -> set[str]:
        """The keys among `keys` that no image row names and that are not kept for an
        older job's sources (retained_blob_keys)."""
        if not keys:
            return set()
        rows = await self._pool.fetch(
            """
            SELECT k.key FROM unnest($1::text[]) AS k(key)
             WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.storage_key = k.key)
               AND NOT EXISTS (SELECT 1 FROM retained_blob_keys r WHERE r.storage_key = k.key)
            """,
            list(keys),
        )
        return {r["key"] for r in rows}

    async def last_finished(self, task: str) -> datetime | None:
        """When the reaper last finished `task` (any replica), if ever."""
        value: datetime | None = await self._pool.fetchval(
            "SELECT finished_at FROM retention_runs WHERE task = $1", task
        )
        return value

    async def record_finished(self, task: str, at: datetime) -> None:
        """Remember that `task` finished at `at`."""
        await self._pool.execute(
            """
            INSERT INTO retention_runs (task, finished_at) VALUES ($1, $2)
            ON CONFLICT (task) DO UPDATE SET finished_at = EXCLUDED.finished_at
            """,
            task,
            at,
        )
