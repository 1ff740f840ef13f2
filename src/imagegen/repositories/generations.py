"""Generation jobs and their event logs (SQL lives here only).

Each method is one statement (a few for the cancel and submit steps); statements that
must commit together run on a unit of work's connection (repositories/unit_of_work.py),
the others on the pool. What a count or a state means for a caller is decided in
services/ and domain/, never here.
"""

from __future__ import annotations

import uuid
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
    Size,
    Style,
)
from imagegen.domain.paging import Cursor
from imagegen.repositories.db import Executor
from imagegen.repositories.images import parse_id

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
        watchers and workers on every replica once the transaction commits."""
        gid = uuid.UUID(generation_id)
        await self._db.execute(
            "INSERT INTO generation_events (generation_id, sequence, event_type, payload) "
            "VALUES ($1, 1, 'queued', '{}'::jsonb)",
            gid,
        )
        await self._db.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(gid))
        await self._db.execute("SELECT pg_notify($1, $2)", QUEUE_CHANNEL, str(gid))

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

    async def get_any(self, generation_id: str) -> Generation | None:
        """A job by id whoever owns it: for workers, never for callers."""
        gid = parse_id(generation_id)
        if gid is None:
            return None
        row = await self._db.fetchrow("SELECT * FROM generations WHERE id = $1", gid)
        return None if row is None else _generation_from_row(row)

    async def claim(self, worker_id: str, lease: timedelta, limit: int) -> list[Generation]:
        """Take up to `limit` queued jobs (oldest first) for this worker, or jobs whose
        worker's lease ran out; other workers skip the rows being claimed."""
        rows = await self._db.fetch(
            """
            UPDATE generations g
               SET state = 'running',
                   attempts = g.attempts + 1,
                   lease_owner = $1,
                   lease_expires_at = now() + $2::interval,
                   started_at = coalesce(g.started_at, now()),
                   updated_at = now()
             WHERE g.id IN (
                   SELECT id FROM generations
                    WHERE state = 'queued'
                       OR (state = 'running' AND lease_expires_at < now())
                    ORDER BY created_at
                    FOR UPDATE SKIP LOCKED
                    LIMIT $3)
            RETURNING g.*
            """,
            worker_id,
            lease,
            limit,
        )
        return [_generation_from_row(r) for r in rows]

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
        """Hand a running job back to the queue (shutdown); its attempt is not counted."""
        status = await self._db.execute(
            "UPDATE generations SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
            "attempts = greatest(attempts - 1, 0), updated_at = now() "
            "WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
            uuid.UUID(generation_id),
            worker_id,
        )
        return bool(status == "UPDATE 1")

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
        """Append one event with the next sequence number and signal watchers on every
        replica, in one statement (one round trip): the job row's lock keeps the numbers
        gap-free, and the notification is sent only if the append commits."""
        row = await self._db.fetchrow(
            """
            WITH next AS (
                UPDATE generations SET last_sequence = last_sequence + 1, updated_at = now()
                 WHERE id = $1 RETURNING last_sequence
            ), appended AS (
                INSERT INTO generation_events (generation_id, sequence, event_type, payload,
                                               preview)
                SELECT $1, last_sequence, $2, $3, $4 FROM next
                RETURNING *
            )
            SELECT appended.*, pg_notify($5, $6) FROM appended
            """,
            uuid.UUID(generation_id),
            event.type.value,
            event.payload,
            event.preview,
            EVENTS_CHANNEL,
            generation_id,
        )
        if row is None:
            raise LookupError(f"generation {generation_id} does not exist")
        return _event_from_row(row)

    async def finish(
        self,
        generation_id: str,
        *,
        state: GenerationState,
        model: str,
        credits: int,
        error_code: str = "",
        error_message: str = "",
        worker_id: str | None = None,
    ) -> bool:
        """Move a running job to a terminal state (inside the caller's unit of work).
        False if this worker no longer holds it or it already ended."""
        status = await self._db.execute(
            """
            UPDATE generations
               SET state = $2, model = $3, credits = $4, error_code = $5, error_message = $6,
                   lease_owner = NULL, lease_expires_at = NULL,
                   completed_at = now(), updated_at = now()
             WHERE id = $1 AND state IN ('queued', 'running')
               AND ($7::text IS NULL OR lease_owner = $7 OR state = 'queued')
            """,
            uuid.UUID(generation_id),
            state.value,
            model,
            credits,
            error_code,
            error_message,
            worker_id,
        )
        return bool(status == "UPDATE 1")

    async def events_after(
        self, generation_id: str, after_sequence: int, limit: int = 500
    ) -> list[GenerationEvent]:
        """Stored events with a sequence above `after_sequence`, in order."""
        rows = await self._db.fetch(
            "SELECT * FROM generation_events WHERE generation_id = $1 AND sequence > $2 "
            "ORDER BY sequence LIMIT $3",
            uuid.UUID(generation_id),
            after_sequence,
            limit,
        )
        return [_event_from_row(r) for r in rows]

    async def list_for_user(
        self,
        user_id: str,
        *,
        states: tuple[GenerationState, ...],
        created_from: datetime | None,
        created_before: datetime | None,
        after: Cursor | None,
        limit: int,
    ) -> list[Generation]:
        """The owner's jobs, newest first, strictly after `after`."""
        rows = await self._db.fetch(
            """
            SELECT * FROM generations
             WHERE user_id = $1
               AND (cardinality($2::text[]) = 0 OR state = ANY($2::text[]))
               AND ($3::timestamptz IS NULL OR created_at >= $3)
               AND ($4::timestamptz IS NULL OR created_at < $4)
               AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::uuid))
             ORDER BY created_at DESC, id DESC
             LIMIT $7
            """,
            user_id,
            [s.value for s in states],
            created_from,
            created_before,
            after.created_at if after else None,
            uuid.UUID(after.id) if after else None,
            limit,
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
