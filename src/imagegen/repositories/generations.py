"""Generation jobs and their event logs (SQL lives here only).

Each method is one statement (a few for the cancel and submit steps); statements that
must commit together run on a unit of work's connection (repositories/unit_of_work.py),
the others on the pool. What a count or a state means for a caller is decided in
services/ and domain/, never here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from imagegen.domain.limits import CountCaps, RequestCounts
from imagegen.domain.models import (
    EditSource,
    EventType,
    Generation,
    GenerationEvent,
    GenerationSource,
    GenerationSpec,
    GenerationState,
    ImageFormat,
    OutpaintSpec,
    Size,
    StoredImage,
    Style,
    UpscaleSpec,
)
from imagegen.domain.paging import Cursor
from imagegen.repositories.db import Executor
from imagegen.repositories.images import (
    IMAGE_COLUMNS_PREFIXED,
    image_from_prefixed,
    parse_id,
)

# A process ignores the NOTIFYs its own pool's connections send (jobs/signals.py): code
# that commits a statement sending one must also signal JobSignals in memory once the
# commit returned, or this process's own watchers and workers will not hear of it.

#: NOTIFY channel that carries a generation id whenever its log grows.
EVENTS_CHANNEL = "imagegen_generation_events"
#: NOTIFY channel that tells workers a job was queued.
QUEUE_CHANNEL = "imagegen_generation_queue"
#: NOTIFY channel that carries the id of a running job its owner cancelled.
CANCEL_CHANNEL = "imagegen_generation_cancel"


@dataclass(frozen=True)
class NewGeneration:
    """What submit stores: a validated spec, its owner, price and provider."""

    id: str
    user_id: str
    sub_account: str
    request_id: str
    spec: GenerationSpec
    provider: str
    credits: int
    extra_spec: dict[str, Any]


@dataclass(frozen=True)
class PastRequest:
    """The job an earlier request with the same request_id made, and its parameters'
    fingerprint (to tell a retry from a reuse)."""

    generation: Generation
    fingerprint: dict[str, Any]


@dataclass(frozen=True)
class NewEvent:
    """An event to append; its sequence number is given by the log."""

    type: EventType
    payload: dict[str, Any]
    preview: bytes | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker just claimed, with what the claim learned about it."""

    generation: Generation
    #: the STARTED event the claim appended (None for a job past its attempts)
    started: GenerationEvent | None
    #: batch indexes an earlier attempt already stored
    stored_indexes: frozenset[int]
    #: whether the owner had cancelled it before the claim
    cancel_requested: bool


@dataclass(frozen=True)
class Claim:
    """What one claim took, and when the first lease of another worker runs out (None
    when no job runs elsewhere)."""

    jobs: tuple[ClaimedJob, ...]
    next_lease_expiry: timedelta | None


@dataclass(frozen=True)
class FinishedJob:
    """A job just moved to its terminal state: its terminal event, how many images it
    stored and the credits they cost."""

    event: GenerationEvent
    image_count: int
    credits: int
    #: its owner has batch jobs queued (the other replicas were told; this one's runner
    #: must be told in memory, as it ignores its own NOTIFYs)
    held_jobs_queued: bool = False


@dataclass(frozen=True)
class LogPage:
    """Events read from a job's log, and the job's state in the same snapshot."""

    events: list[GenerationEvent]
    state: GenerationState
    last_sequence: int
    #: the read stopped at its limit: more events may follow
    full: bool


def spec_to_json(spec: GenerationSpec) -> dict[str, Any]:
    return {
        **spec.fingerprint(),
        "sources": [s.to_json() for s in spec.sources],
        "mask": spec.mask.to_json() if spec.mask else None,
        "size_from_source": spec.size_from_source,
    }


def spec_from_json(data: dict[str, Any]) -> GenerationSpec:
    return GenerationSpec(
        prompt=str(data["prompt"]),
        negative_prompt=str(data.get("negative_prompt", "")),
        style=Style(data["style"]) if data.get("style") else None,
        size=Size(int(data["width"]), int(data["height"])),
        count=int(data["count"]),
        output_format=ImageFormat(data["format"]),
        seed=None if data.get("seed") is None else int(data["seed"]),
        provider=str(data.get("provider", "")),
        model=str(data.get("model") or ""),
        source=GenerationSource(data.get("source") or "api"),
        sources=tuple(EditSource.from_json(s) for s in data.get("sources") or ()),
        mask=EditSource.from_json(data["mask"]) if data.get("mask") else None,
        size_from_source=bool(data.get("size_from_source", False)),
        callback_uri=str(data.get("callback_uri") or ""),
        outpaint=OutpaintSpec.from_json(data["outpaint"]) if data.get("outpaint") else None,
        upscale=UpscaleSpec.from_json(data["upscale"]) if data.get("upscale") else None,
    )


def _generation_from_row(row: asyncpg.Record) -> Generation:
    return Generation(
        id=str(row["id"]),
        user_id=row["user_id"],
        sub_account=row["sub_account"],
        request_id=row["request_id"] or "",
        spec=spec_from_json(row["spec"]),
        state=GenerationState(row["state"]),
        provider=row["provider"],
        model=row["model"],
        credits=row["credits"],
        attempts=row["attempts"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        last_sequence=row["last_sequence"],
        trace_context=dict(row["spec"].get("trace_context") or {}),
        plan=str(row["spec"].get("plan") or "free"),
        batch_id=str(row["batch_id"]) if row["batch_id"] else "",
        first_sequence=row["first_sequence"],
    )


def _event_from_row(row: asyncpg.Record) -> GenerationEvent:
    payload: dict[str, Any] = row["payload"]
    return GenerationEvent(
        generation_id=str(row["generation_id"]),
        sequence=row["sequence"],
        type=EventType(row["event_type"]),
        created_at=row["created_at"],
        percent=int(payload.get("percent", 0)),
        stage=str(payload.get("stage", "")),
        preview=bytes(row["preview"] or b""),
        preview_mime_type=str(payload.get("preview_mime_type", "")),
        error_code=str(payload.get("error_code", "")),
        error_message=str(payload.get("error_message", "")),
        retryable=bool(payload.get("retryable", False)),
        extra={k: str(v) for k, v in payload.items() if k in ("image_id", "image_index")},
    )


#: ListGenerations' page of a user's jobs, newest first, with its filters.
_LIST_SQL = """
SELECT * FROM generations
 WHERE user_id = $1
   AND (cardinality($2::text[]) = 0 OR state = ANY($2::text[]))
   AND ($3::timestamptz IS NULL OR created_at >= $3)
   AND ($4::timestamptz IS NULL OR created_at < $4)
   AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT $7
"""
#: The same page within one batch ($8).
_LIST_BATCH_SQL = """
SELECT * FROM generations
 WHERE batch_id = $8 AND user_id = $1
   AND (cardinality($2::text[]) = 0 OR state = ANY($2::text[]))
   AND ($3::timestamptz IS NULL OR created_at >= $3)
   AND ($4::timestamptz IS NULL OR created_at < $4)
   AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT $7
"""


class GenerationRepository:
    """Jobs, their leases and their append-only, gap-free event logs."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    # --- submit (inside the submit unit of work) ----------------------------------------

    async def lock_user(self, user_id: str) -> None:
        """Take the user's advisory lock until the transaction ends: every replica's
        submits for one user run one at a time, so they count the same limits."""
        await self._db.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('imagegen-user:' || $1, 0))",
            user_id,
        )

    async def find_request(
        self, user_id: str, request_id: str, *, remembered_for: timedelta
    ) -> PastRequest | None:
        """The user's job made for `request_id`, if it is still remembered; an older one
        forgets its request_id first."""
        await self._db.execute(
            "UPDATE generations SET request_id = NULL "
            "WHERE user_id = $1 AND request_id = $2 AND created_at < now() - $3::interval",
            user_id,
            request_id,
            remembered_for,
        )
        row = await self._db.fetchrow(
            "SELECT * FROM generations WHERE user_id = $1 AND request_id = $2",
            user_id,
            request_id,
        )
        if row is None:
            return None
        return PastRequest(_generation_from_row(row), row["fingerprint"])

    async def request_id_taken(self, user_id: str, request_id: str) -> bool:
        """Whether the user has a job for `request_id` (expired or not)."""
        return bool(
            await self._db.fetchval(
                "SELECT 1 FROM generations WHERE user_id = $1 AND request_id = $2",
                user_id,
                request_id,
            )
        )

    async def request_counts(self, user_id: str, caps: CountCaps) -> RequestCounts:
        """Requests accepted in the last hour and day (with the oldest of those counted),
        and jobs queued or running, at the database's now(); each counted newest first
        up to its cap in `caps`, so the index scans stop there whatever the history."""
        row = await self._db.fetchrow(
            """
            SELECT now() AS now, in_hour.n AS hour, in_hour.oldest AS oldest_in_hour,
                   in_day.n AS day, in_day.oldest AS oldest_in_day, active_jobs.n AS active
              FROM (SELECT count(*) AS n, min(created_at) AS oldest
                      FROM (SELECT created_at FROM generations
                             WHERE user_id = $1 AND created_at > now() - interval '1 hour'
                             ORDER BY created_at DESC LIMIT $2) w) in_hour,
                   (SELECT count(*) AS n, min(created_at) AS oldest
                      FROM (SELECT created_at FROM generations
                             WHERE user_id = $1 AND created_at > now() - interval '1 day'
                             ORDER BY created_at DESC LIMIT $3) w) in_day,
                   (SELECT count(*) AS n
                      FROM (SELECT 1 FROM generations
                             WHERE user_id = $1 AND state IN ('queued', 'running')
                             LIMIT $4) w) active_jobs
            """,
            user_id,
            caps.hour,
            caps.day,
            caps.active,
        )
        return RequestCounts(
            now=row["now"],
            last_hour=row["hour"],
            last_day=row["day"],
            active=row["active"],
            oldest_in_hour=row["oldest_in_hour"],
            oldest_in_day=row["oldest_in_day"],
        )

    async def insert(self, job: NewGeneration) -> Generation:
        """Store a queued job (its QUEUED event follows with `announce_queued`)."""
        spec_json = {**spec_to_json(job.spec), **job.extra_spec}
        row = await self._db.fetchrow(
            """
            INSERT INTO generations (
                id, user_id, sub_account, request_id, fingerprint, prompt, negative_prompt,
                style, width, height, image_count, output_format, seed, source, spec,
                provider, state, credits, last_sequence)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                    $16, 'queued', $17, 1)
            RETURNING *
            """,
            uuid.UUID(job.id),
            job.user_id,
            job.sub_account,
            job.request_id or None,
            job.spec.fingerprint(),
            job.spec.prompt,
            job.spec.negative_prompt,
            job.spec.style.value if job.spec.style else "",
            job.spec.size.width,
            job.spec.size.height,
            job.spec.count,
            job.spec.output_format.value,
            job.spec.seed,
            job.spec.source.value,
            spec_json,
            job.provider,
            job.credits,
        )
        return _generation_from_row(row)

    async def announce_queued(self, generation_id: str) -> None:
        """The QUEUED event (sequence 1) of a new job, and the notifications that wake
        watchers and workers on every replica once the transaction commits; one
        statement."""
        await self._db.execute(
            """
            WITH queued AS (
                INSERT INTO generation_events (generation_id, sequence, event_type, payload)
                VALUES ($1, 1, 'queued', '{}'::jsonb)
                RETURNING generation_id
            )
            SELECT pg_notify($2, $4), pg_notify($3, $4) FROM queued
            """,
            uuid.UUID(generation_id),
            EVENTS_CHANNEL,
            QUEUE_CHANNEL,
            generation_id,
        )

    # --- reads and worker steps ---------------------------------------------------------

    async def get(self, user_id: str, generation_id: str) -> Generation | None:
        """The owner's job, or None (also for another user's or a malformed id)."""
        gid = parse_id(generation_id)
        if gid is None:
            return None
        row = await self._db.fetchrow(
            "SELECT * FROM generations WHERE id = $1 AND user_id = $2", gid, user_id
        )
        return None if row is None else _generation_from_row(row)

    async def get_with_images(
        self, user_id: str, generation_id: str
    ) -> tuple[Generation, list[StoredImage]] | None:
        """The owner's job and the images it made (as `ImageRepository.for_generations`
        reads them: soft-deleted ones too, no uploads, in batch order), in one statement;
        None for another user's, a missing or a malformed id."""
        gid = parse_id(generation_id)
        if gid is None:
            return None
        rows = await self._db.fetch(
            f"""
            SELECT g.*, {IMAGE_COLUMNS_PREFIXED}
              FROM generations g
              LEFT JOIN images i
                ON i.generation_id = g.id AND NOT i.upload AND i.user_id = g.user_id
             WHERE g.id = $1 AND g.user_id = $2
             ORDER BY i.batch_index
            """,  # noqa: S608 - IMAGE_COLUMNS_PREFIXED is a fixed fragment
            gid,
            user_id,
        )
        if not rows:
            return None
        images = [image for image in map(image_from_prefixed, rows) if image is not None]
        return _generation_from_row(rows[0]), images

    async def get_any(self, generation_id: str) -> Generation | None:
        """A job by id whoever owns it: for workers, never for callers."""
        gid = parse_id(generation_id)
        if gid is None:
            return None
        row = await self._db.fetchrow("SELECT * FROM generations WHERE id = $1", gid)
        return None if row is None else _generation_from_row(row)

    async def claim(
        self, worker_id: str, lease: timedelta, limit: int, *, max_attempts: int
    ) -> Claim:
        """Take up to `limit` queued jobs (oldest first) for this worker, or jobs whose
        worker's lease ran out; other workers skip the rows being claimed. In the same
        statement: each job's STARTED event (unless it is past `max_attempts`, which
        the worker fails at once) with its NOTIFY, the batch indexes an earlier attempt
        stored (soft-deleted images too: they were delivered; never the uploads it was
        given), and when the next lease of another worker runs out.

        A batch job (max_concurrent set) starts only while its owner runs fewer jobs than
        that. The exact decision is the claim gate of migrations/0011_batches.sql (a
        trigger that leaves the row queued), made under the owner's lock so replicas
        claiming at once cannot both pass. The count below picks only the batch jobs the
        gate should let through, the owner's oldest queued ones up to the free places
        (jobs running, or batch jobs queued before it, come first): so the batch starts
        in its order, and jobs the gate would leave queued take no places of this claim
        from other jobs."""
        rows = await self._db.fetch(
            """
            WITH picked AS (
                SELECT id FROM generations q
                 WHERE (state = 'queued'
                        AND (max_concurrent IS NULL
                             OR max_concurrent > (
                                SELECT count(*) FROM generations ahead
                                 WHERE ahead.user_id = q.user_id
                                   AND (ahead.state = 'running'
                                        OR (ahead.state = 'queued'
                                            AND ahead.max_concurrent IS NOT NULL
                                            AND ahead.created_at < q.created_at)))))
                    OR (state = 'running' AND lease_expires_at < now())
                 ORDER BY created_at
                 FOR UPDATE SKIP LOCKED
                 LIMIT $3
            ), claimed AS (
                UPDATE generations g
                   SET state = 'running',
                       attempts = g.attempts + 1,
                       lease_owner = $1,
                       lease_expires_at = now() + $2::interval,
                       started_at = coalesce(g.started_at, now()),
                       updated_at = now(),
                       last_sequence = g.last_sequence
                           + CASE WHEN g.attempts + 1 <= $4 THEN 1 ELSE 0 END
                  FROM picked
                 WHERE g.id = picked.id
                RETURNING g.*
            ), started AS (
                INSERT INTO generation_events (generation_id, sequence, event_type, payload)
                SELECT id, last_sequence, 'started', jsonb_build_object('attempt', attempts)
                  FROM claimed
                 WHERE attempts <= $4
                RETURNING generation_id, sequence, payload, created_at
            ), next_expiry AS (
                SELECT extract(epoch FROM min(lease_expires_at) - now())::float8 AS seconds
                  FROM generations
                 WHERE state = 'running' AND lease_owner IS DISTINCT FROM $1
            )
            SELECT next_expiry.seconds AS next_expiry_seconds,
                   c.*,
                   s.sequence AS started_sequence,
                   s.payload AS started_payload,
                   s.created_at AS started_event_at,
                   (SELECT coalesce(array_agg(i.batch_index), '{}'::int[])
                      FROM images i
                     WHERE i.generation_id = c.id AND NOT i.upload) AS stored_indexes,
                   CASE WHEN s.sequence IS NOT NULL THEN pg_notify($5, c.id::text) END
              FROM next_expiry
              LEFT JOIN claimed c ON true
              LEFT JOIN started s ON s.generation_id = c.id
            """,
            worker_id,
            lease,
            limit,
            max_attempts,
            EVENTS_CHANNEL,
        )
        jobs = []
        for row in rows:
            if row["id"] is None:
                continue
            started = None
            if row["started_sequence"] is not None:
                started = GenerationEvent(
                    generation_id=str(row["id"]),
                    sequence=row["started_sequence"],
                    type=EventType.STARTED,
                    created_at=row["started_event_at"],
                )
            jobs.append(
                ClaimedJob(
                    generation=_generation_from_row(row),
                    started=started,
                    stored_indexes=frozenset(row["stored_indexes"] or ()),
                    cancel_requested=bool(row["cancel_requested"]),
                )
            )
        seconds = rows[0]["next_expiry_seconds"] if rows else None
        return Claim(
            jobs=tuple(jobs),
            next_lease_expiry=None if seconds is None else timedelta(seconds=seconds),
        )

    async def renew_lease(self, generation_id: str, worker_id: str, lease: timedelta) -> bool:
        """Extend this worker's lease; False if the job is no longer ours."""
        status = await self._db.execute(
            "UPDATE generations SET lease_expires_at = now() + $3::interval "
            "WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
            uuid.UUID(generation_id),
            worker_id,
            lease,
        )
        return bool(status == "UPDATE 1")

    async def release(self, generation_id: str, worker_id: str) -> bool:
        """Hand a running job back to the queue (shutdown); its attempt is not counted.
        Workers on every replica are notified, as for a new job."""
        row = await self._db.fetchrow(
            "UPDATE generations SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
            "attempts = greatest(attempts - 1, 0), updated_at = now() "
            "WHERE id = $1 AND lease_owner = $2 AND state = 'running' "
            "RETURNING pg_notify($3, id::text)",
            uuid.UUID(generation_id),
            worker_id,
            QUEUE_CHANNEL,
        )
        return row is not None

    async def set_provider(self, generation_id: str, provider: str) -> None:
        """Record that a fallback provider serves the job."""
        await self._db.execute(
            "UPDATE generations SET provider = $2, updated_at = now() WHERE id = $1",
            uuid.UUID(generation_id),
            provider,
        )

    async def queue_stats(self) -> tuple[int, float]:
        """How many jobs wait, and how long the oldest has waited, in seconds."""
        row = await self._db.fetchrow(
            "SELECT count(*) AS depth, "
            "coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest "
            "FROM generations WHERE state = 'queued'"
        )
        return int(row["depth"]), float(row["oldest"])

    async def is_cancel_requested(self, generation_id: str) -> bool:
        value = await self._db.fetchval(
            "SELECT cancel_requested FROM generations WHERE id = $1", uuid.UUID(generation_id)
        )
        return bool(value)

    async def append_event(self, generation_id: str, event: NewEvent) -> GenerationEvent:
        """Append one event (see `append_events`)."""
        (appended,) = await self.append_events(generation_id, (event,))
        return appended

    async def append_events(
        self, generation_id: str, events: Sequence[NewEvent]
    ) -> list[GenerationEvent]:
        """Append events with the next sequence numbers, in order, and signal watchers on
        every replica, in one statement (one round trip): the job row's lock keeps the
        numbers gap-free, and the notification is sent only if the append commits."""
        rows = await self._db.fetch(
            """
            WITH next AS (
                UPDATE generations
                   SET last_sequence = last_sequence + cardinality($2::text[]),
                       updated_at = now()
                 WHERE id = $1
                RETURNING last_sequence - cardinality($2::text[]) AS base
            ), appended AS (
                INSERT INTO generation_events (generation_id, sequence, event_type, payload,
                                               preview)
                SELECT $1, next.base + e.ord, e.event_type, $3::jsonb -> (e.ord::int - 1),
                       e.preview
                  FROM next,
                       unnest($2::text[], $4::bytea[]) WITH ORDINALITY
                           AS e(event_type, preview, ord)
                RETURNING *
            )
            SELECT appended.*, pg_notify($5, $6) FROM appended ORDER BY sequence
            """,
            uuid.UUID(generation_id),
            [event.type.value for event in events],
            [event.payload for event in events],
            [event.preview for event in events],
            EVENTS_CHANNEL,
            generation_id,
        )
        if not rows:
            raise LookupError(f"generation {generation_id} does not exist")
        return [_event_from_row(row) for row in rows]

    async def finish(
        self,
        generation_id: str,
        *,
        state: GenerationState,
        model: str,
        credits_per_image: int,
        terminal: NewEvent,
        error_code: str = "",
        error_message: str = "",
        worker_id: str | None = None,
    ) -> FinishedJob | None:
        """Move a running job to a terminal state and append its terminal event, in one
        statement (inside the caller's unit of work). Its credits are the price of the
        images it made (soft-deleted ones too: they were delivered; not its uploads); the
        event's payload gains their count as `images`. When its owner has batch jobs
        queued, the claim gate may have held them back for this one: the workers of every
        replica are told (NOTIFY on the queue channel, with the commit). None if this
        worker no longer holds the job or it already ended."""
        row = await self._db.fetchrow(
            """
            WITH counted AS (
                SELECT count(*)::int AS images FROM images
                 WHERE generation_id = $1 AND NOT upload
            ), ended AS (
                UPDATE generations g
                   SET state = $2, model = $3, credits = $4 * counted.images,
                       error_code = $5, error_message = $6,
                       lease_owner = NULL, lease_expires_at = NULL,
                       completed_at = now(), updated_at = now(),
                       last_sequence = g.last_sequence + 1
                  FROM counted
                 WHERE g.id = $1 AND g.state IN ('queued', 'running')
                   AND ($7::text IS NULL OR g.lease_owner = $7 OR g.state = 'queued')
                RETURNING g.last_sequence, g.credits, counted.images, g.user_id
            ), appended AS (
                INSERT INTO generation_events (generation_id, sequence, event_type, payload)
                SELECT $1, ended.last_sequence, $8,
                       $9::jsonb || jsonb_build_object('images', ended.images)
                  FROM ended
                RETURNING *
            ), held AS (
                SELECT EXISTS (
                    SELECT 1 FROM generations q, ended
                     WHERE q.user_id = ended.user_id AND q.state = 'queued'
                       AND q.max_concurrent IS NOT NULL
                ) AS queued
            )
            SELECT appended.*, ended.images AS image_count, ended.credits AS job_credits,
                   held.queued AS held_jobs_queued, pg_notify($10, $11),
                   CASE WHEN held.queued THEN pg_notify($12, '') END
              FROM appended, ended, held
            """,
            uuid.UUID(generation_id),
            state.value,
            model,
            credits_per_image,
            error_code,
            error_message,
            worker_id,
            terminal.type.value,
            terminal.payload,
            EVENTS_CHANNEL,
            generation_id,
            QUEUE_CHANNEL,
        )
        if row is None:
            return None
        return FinishedJob(
            event=_event_from_row(row),
            image_count=row["image_count"],
            credits=row["job_credits"],
            held_jobs_queued=row["held_jobs_queued"],
        )

    async def read_log(
        self, generation_id: str, after_sequence: int, limit: int = 500
    ) -> LogPage:
        """Stored events with a sequence above `after_sequence`, in order (at most
        `limit`), with the job's state and last sequence read in the same snapshot.
        LookupError for a job that does not exist."""
        rows = await self._db.fetch(
            """
            SELECT g.state AS job_state, g.last_sequence AS job_last_sequence, e.*
              FROM generations g
              LEFT JOIN LATERAL (
                    SELECT * FROM generation_events
                     WHERE generation_id = g.id AND sequence > $2
                     ORDER BY sequence
                     LIMIT $3) e ON true
             WHERE g.id = $1
             ORDER BY e.sequence
            """,
            uuid.UUID(generation_id),
            after_sequence,
            limit,
        )
        if not rows:
            raise LookupError(f"generation {generation_id} does not exist")
        return LogPage(
            events=[_event_from_row(r) for r in rows if r["sequence"] is not None],
            state=GenerationState(rows[0]["job_state"]),
            last_sequence=rows[0]["job_last_sequence"],
            full=len(rows) >= limit,
        )

    async def list_for_user(
        self,
        user_id: str,
        *,
        states: tuple[GenerationState, ...],
        created_from: datetime | None,
        created_before: datetime | None,
        after: Cursor | None,
        limit: int,
        batch_id: str = "",
    ) -> list[Generation]:
        """The owner's jobs, newest first, strictly after `after`; only the jobs of
        `batch_id` when one is given (none for a malformed id)."""
        arguments: list[Any] = [
            user_id,
            [s.value for s in states],
            created_from,
            created_before,
            after.created_at if after else None,
            uuid.UUID(after.id) if after else None,
            limit,
        ]
        sql = _LIST_SQL
        if batch_id:
            batch = parse_id(batch_id)
            if batch is None:
                return []
            # Its own statement, so that its plan reads the batch's rows by
            # generations_batch_idx rather than the user's whole history.
            sql = _LIST_BATCH_SQL
            arguments.append(batch)
        rows = await self._db.fetch(sql, *arguments)
        return [_generation_from_row(r) for r in rows]

    async def batch_jobs(self, user_id: str, batch_id: str) -> list[Generation]:
        """The jobs of one of the owner's batches, in the order they were submitted;
        empty for anyone else's batch or a malformed id."""
        batch = parse_id(batch_id)
        if batch is None:
            return []
        rows = await self._db.fetch(
            "SELECT * FROM generations WHERE batch_id = $1 AND user_id = $2 "
            "ORDER BY batch_index",
            batch,
            user_id,
        )
        return [_generation_from_row(r) for r in rows]

    # --- cancel (inside the cancel unit of work) ----------------------------------------

    async def lock_owned(self, user_id: str, generation_id: str) -> Generation | None:
        """The owner's job, locked until the transaction ends; None for anyone else's
        or a malformed id."""
        gid = parse_id(generation_id)
        if gid is None:
            return None
        row = await self._db.fetchrow(
            "SELECT * FROM generations WHERE id = $1 AND user_id = $2 FOR UPDATE",
            gid,
            user_id,
        )
        return None if row is None else _generation_from_row(row)

    async def cancel_queued(self, generation_id: str) -> Generation:
        """End a queued job CANCELLED at once, with its CANCELLED event."""
        gid = uuid.UUID(generation_id)
        row = await self._db.fetchrow(
            "UPDATE generations SET state = 'cancelled', cancel_requested = true, "
            "credits = 0, completed_at = now(), updated_at = now(), "
            "last_sequence = last_sequence + 1 WHERE id = $1 RETURNING *",
            gid,
        )
        await self._db.execute(
            "INSERT INTO generation_events (generation_id, sequence, event_type) "
            "VALUES ($1, $2, 'cancelled')",
            gid,
            row["last_sequence"],
        )
        return _generation_from_row(row)

    async def request_cancel(self, generation_id: str) -> Generation:
        """Flag a running job for its worker's next checkpoint, and wake that worker
        wherever it runs."""
        gid = uuid.UUID(generation_id)
        row = await self._db.fetchrow(
            "UPDATE generations SET cancel_requested = true, updated_at = now() "
            "WHERE id = $1 RETURNING *",
            gid,
        )
        await self._db.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(gid))
        return _generation_from_row(row)

    async def notify_changed(self, generation_id: str) -> None:
        """Wake the job's watchers on every replica (once the transaction commits)."""
        await self._db.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, generation_id)
