"""Usage records: one per attempt of a job, and one per prompt enhancement (SQL lives
here only)."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from imagegen.domain.usage import UsageKind, UsageRecord, UsageRow, UsageTotalsRow
from imagegen.repositories.db import Executor


class UnknownTimeZone(Exception):
    """The database does not know the time zone it was asked to group days by."""


class UsageRepository:
    """Writes and reads usage records, scoped to their user."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def insert(self, record: UsageRecord) -> None:
        """Record an attempt (in the job's finishing unit of work); a repeated attempt
        of a job is ignored. A record without a job (an enhancement) is always added."""
        await self._db.execute(
            """
            INSERT INTO usage_records (id, user_id, generation_id, attempt, provider, model,
                                       source, status, image_count, credits, cost_cents,
                                       error_code, error_message, requested_at, kind)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
            ON CONFLICT (generation_id, attempt) DO NOTHING
            """,
            uuid.uuid4(),
            record.user_id,
            uuid.UUID(record.generation_id) if record.generation_id else None,
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
            record.kind.value,
        )

    async def for_generation(self, user_id: str, generation_id: str) -> list[UsageRecord]:
        """A job's usage records, oldest attempt first."""
        rows = await self._db.fetch(
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
                kind=UsageKind(r["kind"]),
            )
            for r in rows
        ]


def _usage_row(r: asyncpg.Record) -> UsageRow:
    return UsageRow(
        id=str(r["id"]),
        generation_id=str(r["generation_id"]) if r["generation_id"] else "",
        attempt=r["attempt"],
        provider=r["provider"],
        model=r["model"],
        source=r["source"],
        status=r["status"],
        image_count=r["image_count"],
        credits=r["credits"],
        cost_cents=r["cost_cents"],
        error_code=r["error_code"],
        error_message=r["error_message"],
        requested_at=r["requested_at"],
        completed_at=r["completed_at"],
        kind=UsageKind(r["kind"]),
    )


_TOTALS = """
    count(*) AS requests,
    count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
    count(*) FILTER (WHERE status = 'failed') AS failed,
    count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
    coalesce(sum(image_count), 0) AS image_count,
    coalesce(sum(credits), 0) AS credits,
    coalesce(sum(cost_cents), 0) AS cost_cents,
    coalesce(avg(extract(epoch FROM completed_at - requested_at))
             FILTER (WHERE status = 'succeeded' AND kind = 'generation'), 0) AS average_seconds
"""


class UsageQueries:
    """Reads of a user's usage records."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def list_for_user(
        self,
        user_id: str,
        *,
        statuses: tuple[str, ...],
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, str] | None,
        limit: int,
        newest_first: bool = True,
    ) -> list[UsageRow]:
        order = "DESC" if newest_first else "ASC"
        compare = "<" if newest_first else ">"
        rows = await self._pool.fetch(
            f"""
            SELECT * FROM usage_records
             WHERE user_id = $1
               AND (cardinality($2::text[]) = 0 OR status = ANY($2::text[]))
               AND ($3::timestamptz IS NULL OR requested_at >= $3)
               AND ($4::timestamptz IS NULL OR requested_at < $4)
               AND ($5::timestamptz IS NULL OR (requested_at, id) {compare} ($5, $6::uuid))
             ORDER BY requested_at {order}, id {order}
             LIMIT $7
            """,  # noqa: S608 - order and comparison are fixed strings above
            user_id,
            list(statuses),
            start,
            end,
            after[0] if after else None,
            uuid.UUID(after[1]) if after else None,
            limit,
        )
        return [_usage_row(r) for r in rows]

    async def totals(
        self, user_id: str, start: datetime, end: datetime, time_zone: str
    ) -> tuple[UsageTotalsRow, list[UsageTotalsRow], list[UsageTotalsRow], list[UsageTotalsRow]]:
        """Sums over [start, end): in total, by provider, by day (in `time_zone`), by source."""
        where = "WHERE user_id = $1 AND requested_at >= $2 AND requested_at < $3"
        args = (user_id, start, end)
        total = await self._pool.fetchrow(
            f"SELECT '' AS key, {_TOTALS} FROM usage_records {where}",  # noqa: S608
            *args,
        )
        groups = []
        for key in ("provider", "source"):
            groups.append(
                await self._pool.fetch(
                    f"SELECT {key} AS key, {_TOTALS} FROM usage_records {where} "  # noqa: S608
                    f"GROUP BY {key} ORDER BY {key}",
                    *args,
                )
            )
        try:
            by_day = await self._pool.fetch(
                f"SELECT to_char(requested_at AT TIME ZONE $4, 'YYYY-MM-DD') AS key, {_TOTALS} "  # noqa: S608
                f"FROM usage_records {where} GROUP BY 1 ORDER BY 1",
                *args,
                time_zone,
            )
        except asyncpg.InvalidParameterValueError:
            # The database's own time zone list has the last word; the service checked
            # the name against Python's, and the two need not be the same release.
            raise UnknownTimeZone(time_zone) from None

        def convert(r: asyncpg.Record) -> UsageTotalsRow:
            return UsageTotalsRow(
                key=r["key"],
                requests=r["requests"],
                succeeded=r["succeeded"],
                failed=r["failed"],
                cancelled=r["cancelled"],
                image_count=int(r["image_count"]),
                credits=int(r["credits"]),
                cost_cents=int(r["cost_cents"]),
                average_seconds=float(r["average_seconds"]),
            )

        return (
            convert(total),
            [convert(r) for r in groups[0]],
            [convert(r) for r in by_day],
            [convert(r) for r in groups[1]],
        )

    async def generations_for_export(
        self,
        user_id: str,
        *,
        states: tuple[str, ...],
        start: datetime,
        end: datetime,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        """Jobs oldest first, each with its image ids, for the history export."""
        return list(
            await self._pool.fetch(
                """
                SELECT g.*, coalesce(
                         (SELECT array_agg(i.id::text ORDER BY i.batch_index)
                            FROM images i WHERE i.generation_id = g.id AND i.deleted_at IS NULL),
                         '{}') AS image_ids,
                       coalesce(
                         (SELECT array_agg(i.storage_key ORDER BY i.batch_index)
                            FROM images i WHERE i.generation_id = g.id AND i.deleted_at IS NULL),
                         '{}') AS image_keys
                  FROM generations g
                 WHERE g.user_id = $1
                   AND (cardinality($2::text[]) = 0 OR g.state = ANY($2::text[]))
                   AND g.created_at >= $3 AND g.created_at < $4
                   AND ($5::timestamptz IS NULL OR (g.created_at, g.id) > ($5, $6::uuid))
                 ORDER BY g.created_at, g.id
                 LIMIT $7
                """,
                user_id,
                list(states),
                start,
                end,
                after[0] if after else None,
                uuid.UUID(after[1]) if after else None,
                limit,
            )
        )
