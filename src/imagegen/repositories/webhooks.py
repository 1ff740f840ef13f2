"""The webhook outbox: callbacks to deliver and every attempt at them (SQL lives here only).

A callback row is written by the unit of work that ends its job (so a job that ended has
its callback, whatever happens to the process after the commit), claimed by a worker on
any replica with FOR UPDATE SKIP LOCKED, and finished by `record`. What to send, when to
try again and when to give up is decided in services/ and domain/.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from imagegen.domain.models import WebhookAttempt
from imagegen.domain.webhooks import DeliveryOutcome
from imagegen.repositories.db import Executor

#: NOTIFY channel that tells webhook workers a callback became due now (queued, or a
#: claim given back), so no worker has to poll for it.
WEBHOOK_CHANNEL = "imagegen_webhooks"


@dataclass(frozen=True)
class NewWebhook:
    """A callback to queue: about one job (`generation_id`) or one batch (`batch_id`)."""

    webhook_id: str
    user_id: str
    url: str
    event_type: str
    generation_id: str = ""
    batch_id: str = ""


@dataclass(frozen=True)
class ClaimedWebhook:
    """A callback a worker holds for one attempt (number `attempt`, from 1)."""

    webhook_id: str
    user_id: str
    generation_id: str
    batch_id: str
    url: str
    event_type: str
    event_time: datetime
    attempt: int
    claimed_by: str


def _claimed_from_row(row: asyncpg.Record) -> ClaimedWebhook:
    return ClaimedWebhook(
        webhook_id=row["webhook_id"],
        user_id=row["user_id"],
        generation_id=str(row["generation_id"]) if row["generation_id"] else "",
        batch_id=row["batch_id"] or "",
        url=row["url"],
        event_type=row["event_type"],
        event_time=row["event_time"],
        attempt=row["attempts"],
        claimed_by=row["claimed_by"],
    )


class WebhookOutbox:
    """Queued callbacks, their claims and their attempts."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def enqueue(self, webhook: NewWebhook) -> None:
        """Queue a callback, due now (inside the unit of work that ends its job or batch).
        A second one for the same job or batch is ignored: each ends once. The workers
        are told with the commit (NOTIFY), in the same statement."""
        await self._db.execute(
            """
            WITH queued AS (
                INSERT INTO webhook_deliveries (webhook_id, user_id, generation_id, batch_id,
                                                url, event_type)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT DO NOTHING
                RETURNING 1
            )
            SELECT pg_notify($7, '') FROM queued
            """,
            webhook.webhook_id,
            webhook.user_id,
            uuid.UUID(webhook.generation_id) if webhook.generation_id else None,
            webhook.batch_id or None,
            webhook.url,
            webhook.event_type,
            WEBHOOK_CHANNEL,
        )

    async def claim(self, worker_id: str, lease: timedelta, limit: int) -> list[ClaimedWebhook]:
        """Take up to `limit` due callbacks (the longest due first) for one attempt each:
        the attempt is counted and the row is not due again until `lease` has passed, so
        a worker that dies mid-attempt leaves it to another. Other workers skip the rows
        being claimed."""
        rows = await self._db.fetch(
            """
            UPDATE webhook_deliveries d
               SET attempts = d.attempts + 1,
                   claimed_by = $1,
                   next_attempt_at = now() + $2::interval,
                   updated_at = now()
             WHERE d.webhook_id IN (
                   SELECT webhook_id FROM webhook_deliveries
                    WHERE state = 'pending' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at
                    FOR UPDATE SKIP LOCKED
                    LIMIT $3)
            RETURNING d.*
            """,
            worker_id,
            lease,
            limit,
        )
        return [_claimed_from_row(r) for r in rows]

    async def record(
        self,
        claimed: ClaimedWebhook,
        attempt_time: datetime,
        outcome: DeliveryOutcome,
        retry_after: timedelta | None,
    ) -> bool:
        """Record the attempt, and what follows it: delivered (never sent again), due again
        after `retry_after`, or given up (`retry_after` None). One statement. False when
        the claim was lost meanwhile (the attempt is recorded all the same)."""
        if outcome.delivered:
            state = "delivered"
        elif retry_after is None:
            state = "failed"
        else:
            state = "pending"
        row = await self._db.fetchrow(
            """
            WITH attempt AS (
                INSERT INTO webhook_attempts (webhook_id, attempt, attempt_time, http_status,
                                              error, delivered)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT DO NOTHING
            ), updated AS (
                UPDATE webhook_deliveries
                   SET state = $7,
                       next_attempt_at = CASE WHEN $7 = 'pending'
                                              THEN now() + $8::interval
                                              ELSE next_attempt_at END,
                       claimed_by = NULL,
                       updated_at = now()
                 WHERE webhook_id = $1 AND attempts = $2 AND claimed_by = $9
                   AND state = 'pending'
                RETURNING 1
            )
            SELECT count(*) AS held FROM updated
            """,
            claimed.webhook_id,
            claimed.attempt,
            attempt_time,
            outcome.http_status,
            outcome.error,
            outcome.delivered,
            state,
            retry_after or timedelta(0),
            claimed.claimed_by,
        )
        return bool(row["held"])

    async def release(self, claimed: ClaimedWebhook) -> None:
        """Give back a claim whose attempt was not made (shutdown): due again now, and the
        attempt not counted; the other replicas' workers are told (NOTIFY)."""
        await self._db.execute(
            """
            WITH released AS (
                UPDATE webhook_deliveries
                   SET attempts = attempts - 1, claimed_by = NULL, next_attempt_at = now(),
                       updated_at = now()
                 WHERE webhook_id = $1 AND attempts = $2 AND claimed_by = $3
                   AND state = 'pending'
                RETURNING 1
            )
            SELECT pg_notify($4, '') FROM released
            """,
            claimed.webhook_id,
            claimed.attempt,
            claimed.claimed_by,
            WEBHOOK_CHANNEL,
        )

    async def next_due_in(self) -> float | None:
        """Seconds until the next pending callback falls due (a retry's delay, or a claim
        whose lease runs out); 0 when one is due already, None when none is pending."""
        # No greatest(..., 0) in SQL: it ignores a NULL, and "none pending" would read 0.
        seconds = await self._db.fetchval(
            """
            SELECT extract(epoch FROM min(next_attempt_at) - now())
              FROM webhook_deliveries
             WHERE state = 'pending'
            """
        )
        return None if seconds is None else max(float(seconds), 0.0)

    async def attempts_for(
        self, generation_ids: Sequence[str]
    ) -> dict[str, tuple[WebhookAttempt, ...]]:
        """Every attempt at the callbacks of these jobs, oldest first, by job id."""
        if not generation_ids:
            return {}
        rows = await self._db.fetch(
            """
            SELECT d.generation_id, a.*
              FROM webhook_deliveries d
              JOIN webhook_attempts a USING (webhook_id)
             WHERE d.generation_id = ANY($1::uuid[])
             ORDER BY d.generation_id, a.attempt
            """,
            [uuid.UUID(g) for g in generation_ids],
        )
        found: dict[str, list[WebhookAttempt]] = {}
        for row in rows:
            found.setdefault(str(row["generation_id"]), []).append(
                WebhookAttempt(
                    webhook_id=row["webhook_id"],
                    attempt=row["attempt"],
                    attempt_time=row["attempt_time"],
                    http_status=row["http_status"],
                    error=row["error"],
                    delivered=row["delivered"],
                )
            )
        return {generation_id: tuple(attempts) for generation_id, attempts in found.items()}
