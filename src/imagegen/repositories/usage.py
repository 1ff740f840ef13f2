"""Usage records: one per attempt of a job (SQL lives here only)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class UsageRecord:
    """What one attempt cost and how it ended."""

    user_id: str
    generation_id: str
    attempt: int
    provider: str
    model: str
    source: str
    status: str  # succeeded | failed | cancelled
    image_count: int
    credits: int
    requested_at: datetime
    error_code: str = ""
    error_message: str = ""
    cost_cents: int | None = None


class UsageRepository:
    """Writes and reads usage records, scoped to their user."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert(self, conn: asyncpg.Connection, record: UsageRecord) -> None:
        """Record an attempt (caller's transaction); a repeated attempt is ignored."""
        await conn.execute(
            """
            INSERT INTO usage_records (id, user_id, generation_id, attempt, provider, model,
                                       source, status, image_count, credits, cost_cents,
                                       error_code, error_message, requested_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            ON CONFLICT (generation_id, attempt) DO NOTHING
            """,
            uuid.uuid4(),
            record.user_id,
            uuid.UUID(record.generation_id),
            record.attempt,
            record.provider,
            record.model,
            record.source,
            record.status,
            record.image_count,
            record.credits,
            record.cost_cents,
            record.error_code,
            record.error_message[:1000],
            record.requested_at,
        )

    async def for_generation(self, user_id: str, generation_id: str) -> list[UsageRecord]:
        """A job's usage records, oldest attempt first."""
        rows = await self._pool.fetch(
            "SELECT * FROM usage_records WHERE user_id = $1 AND generation_id = $2 "
            "ORDER BY attempt",
            user_id,
            uuid.UUID(generation_id),
        )
        return [
            UsageRecord(
                user_id=r["user_id"],
                generation_id=str(r["generation_id"]),
                attempt=r["attempt"],
                provider=r["provider"],
                model=r["model"],
                source=r["source"],
                status=r["status"],
                image_count=r["image_count"],
                credits=r["credits"],
                requested_at=r["requested_at"],
                error_code=r["error_code"],
                error_message=r["error_message"],
                cost_cents=r["cost_cents"],
            )
            for r in rows
        ]
