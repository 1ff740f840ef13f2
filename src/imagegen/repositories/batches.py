"""Batches of jobs submitted together (SQL lives here only).

A batch row is written by BatchGenerate's unit of work together with its jobs (which
point at it from `generations.batch_id`), and counted down by the units of work that end
its jobs. Which jobs may start while others of their owner run is decided by the claim
gate of migrations/0011_batches.sql; what a batch may hold is decided in services/ and
domain/.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from imagegen.repositories.db import Executor


@dataclass(frozen=True)
class NewBatch:
    """What BatchGenerate stores: the batch's owner, idempotency key and parameters."""

    id: str
    user_id: str
    request_id: str
    #: every spec's fingerprint, in order, and the callback URL
    fingerprint: dict[str, Any]
    #: the whole URL to POST to once every job has ended; empty for none
    callback_uri: str
    job_count: int


@dataclass(frozen=True)
class PastBatch:
    """The batch an earlier request with the same request_id made, and its parameters'
    fingerprint (to tell a retry from a reuse)."""

    id: str
    fingerprint: dict[str, Any]


@dataclass(frozen=True)
class BatchJobEnded:
    """A batch after one of its jobs ended: whether that was its last, and where to tell."""

    #: jobs of the batch that have not ended yet
    unfinished_jobs: int
    #: the whole callback URL; empty for none
    callback_uri: str

    @property
    def last(self) -> bool:
        """Whether the job that just ended was the batch's last."""
        return self.unfinished_jobs == 0


class BatchRepository:
    """Batch rows: stored with their jobs, found again by request_id, counted down as
    their jobs end."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def find_request(
        self, user_id: str, request_id: str, *, remembered_for: timedelta
    ) -> PastBatch | None:
        """The user's batch made for `request_id`, if it is still remembered; an older one
        forgets its request_id first (as GenerationRepository.find_request)."""
        await self._db.execute(
            "UPDATE batches SET request_id = NULL "
            "WHERE user_id = $1 AND request_id = $2 AND created_at < now() - $3::interval",
            user_id,
            request_id,
            remembered_for,
        )
        row = await self._db.fetchrow(
            "SELECT id, fingerprint FROM batches WHERE user_id = $1 AND request_id = $2",
            user_id,
            request_id,
        )
        if row is None:
            return None
        return PastBatch(id=str(row["id"]), fingerprint=row["fingerprint"])

    async def request_id_taken(self, user_id: str, request_id: str) -> bool:
        """Whether one of the user's batches holds `request_id` (expired or not)."""
        return bool(
            await self._db.fetchval(
                "SELECT 1 FROM batches WHERE user_id = $1 AND request_id = $2",
                user_id,
                request_id,
            )
        )

    async def insert(self, batch: NewBatch) -> None:
        """Store a batch with all of its jobs unfinished (inside the unit of work that
        inserts the jobs; `attach_jobs` links them)."""
        await self._db.execute(
            """
            INSERT INTO batches (id, user_id, request_id, fingerprint, callback_uri, job_count,
                                 unfinished_jobs)
            VALUES ($1, $2, $3, $4, $5, $6, $6)
            """,
            uuid.UUID(batch.id),
            batch.user_id,
            batch.request_id or None,
            batch.fingerprint,
            batch.callback_uri,
            batch.job_count,
        )

    async def attach_jobs(
        self, batch_id: str, job_ids: Sequence[str], *, max_concurrent: int | None
    ) -> None:
        """Make the just-inserted jobs the batch's, in the order given, each waiting to
        start while its owner runs `max_concurrent` jobs (None: no such wait). One
        statement. A batch's jobs are inserted in one transaction, so they share its
        now(): each is stamped a microsecond after the one before it, so that everything
        ordered by submit time (the workers' claim, ListGenerations) keeps the request's
        order."""
        await self._db.execute(
            """
            UPDATE generations g
               SET batch_id = $1, batch_index = job.index - 1, max_concurrent = $3,
                   created_at = g.created_at + (job.index - 1) * interval '1 microsecond'
              FROM unnest($2::uuid[]) WITH ORDINALITY AS job(id, index)
             WHERE g.id = job.id
            """,
            uuid.UUID(batch_id),
            [uuid.UUID(job_id) for job_id in job_ids],
            max_concurrent,
        )

    async def job_ended(self, batch_id: str) -> BatchJobEnded:
        """Count one of the batch's jobs as ended (inside the unit of work that ends it).
        The row stays locked until that unit commits, so of two jobs ending at the same
        moment on two replicas, exactly one sees the count reach 0."""
        row = await self._db.fetchrow(
            """
            UPDATE batches
               SET unfinished_jobs = unfinished_jobs - 1,
                   completed_at = CASE WHEN unfinished_jobs = 1 THEN now() END
             WHERE id = $1
            RETURNING unfinished_jobs, callback_uri
            """,
            uuid.UUID(batch_id),
        )
        if row is None:
            raise LookupError(f"batch {batch_id} does not exist")
        return BatchJobEnded(
            unfinished_jobs=row["unfinished_jobs"], callback_uri=row["callback_uri"]
        )
