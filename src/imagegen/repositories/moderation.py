"""Moderation decisions and per-user abuse counters (SQL lives here only)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from imagegen.domain.moderation import Decision, Purpose


@dataclass(frozen=True)
class DecisionRecord:
    """One stored moderation decision. Texts appear only by hash unless the deployment
    stores them (then only for blocked and flagged decisions)."""

    id: str
    user_id: str
    sub_account: str
    plan: str
    purpose: Purpose
    decision: Decision
    categories: tuple[str, ...]
    scores: dict[str, float]
    moderators: str
    unavailable: tuple[str, ...]
    text_sha256: dict[str, str]
    texts: dict[str, str] | None
    generation_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class UserAbuseState:
    """A user's abuse counters (all time) and current suspension."""

    user_id: str
    blocked_total: int
    flagged_total: int
    failed_generations: int
    last_blocked_at: datetime | None
    last_failed_at: datetime | None
    suspended_until: datetime | None
    suspensions: int


def _record_from_row(row: asyncpg.Record) -> DecisionRecord:
    return DecisionRecord(
        id=str(row["id"]),
        user_id=row["user_id"],
        sub_account=row["sub_account"],
        plan=row["plan"],
        purpose=Purpose(row["purpose"]),
        decision=Decision(row["decision"]),
        categories=tuple(row["categories"]),
        scores={str(k): float(v) for k, v in (row["scores"] or {}).items()},
        moderators=row["moderators"],
        unavailable=tuple(row["unavailable"]),
        text_sha256={str(k): str(v) for k, v in (row["text_sha256"] or {}).items()},
        texts=None if row["texts"] is None else {str(k): str(v) for k, v in row["texts"].items()},
        generation_id=None if row["generation_id"] is None else str(row["generation_id"]),
        created_at=row["created_at"],
    )


def _state_from_row(row: asyncpg.Record) -> UserAbuseState:
    return UserAbuseState(
        user_id=row["user_id"],
        blocked_total=row["blocked_total"],
        flagged_total=row["flagged_total"],
        failed_generations=row["failed_generations"],
        last_blocked_at=row["last_blocked_at"],
        last_failed_at=row["last_failed_at"],
        suspended_until=row["suspended_until"],
        suspensions=row["suspensions"],
    )


class ModerationRepository:
    """Stores decisions, counts a user's blocks in a window, keeps suspensions."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def suspended_until(self, user_id: str) -> datetime | None:
        """The end of the user's latest suspension (maybe already past), or None."""
        value: datetime | None = await self._pool.fetchval(
            "SELECT suspended_until FROM moderation_users WHERE user_id = $1", user_id
        )
        return value

    async def record(
        self, record: DecisionRecord, *, windows: tuple[timedelta, ...] = ()
    ) -> tuple[int, ...]:
        """Store a decision; a blocked or flagged one also counts on its user. For a
        blocked one, returns the user's blocks within each of `windows` up to the
        decision's time (this one included); otherwise zeros."""
        if record.decision is Decision.ALLOWED:
            # The common case touches one row: one statement, no transaction round trips.
            async with self._pool.acquire() as conn:
                await self._insert(conn, record)
            return tuple(0 for _ in windows)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._insert(conn, record)
            if record.decision is Decision.FLAGGED:
                await conn.execute(
                    """
                    INSERT INTO moderation_users (user_id, flagged_total) VALUES ($1, 1)
                    ON CONFLICT (user_id) DO UPDATE
                       SET flagged_total = moderation_users.flagged_total + 1,
                           updated_at = now()
                    """,
                    record.user_id,
                )
            if record.decision is not Decision.BLOCKED:
                return tuple(0 for _ in windows)
            await conn.execute(
                """
                INSERT INTO moderation_users (user_id, blocked_total, last_blocked_at)
                VALUES ($1, 1, $2)
                ON CONFLICT (user_id) DO UPDATE
                   SET blocked_total = moderation_users.blocked_total + 1,
                       last_blocked_at = GREATEST(moderation_users.last_blocked_at, $2),
                       updated_at = now()
                """,
                record.user_id,
                record.created_at,
            )
            counts: list[int] = []
            for window in windows:
                count = await conn.fetchval(
                    """
                    SELECT count(*) FROM moderation_decisions
                    WHERE user_id = $1 AND decision = 'blocked'
                      AND created_at > $2 AND created_at <= $3
                    """,
                    record.user_id,
                    record.created_at - window,
                    record.created_at,
                )
                counts.append(int(count))
            return tuple(counts)

    @staticmethod
    async def _insert(conn: asyncpg.Connection, record: DecisionRecord) -> None:
        await conn.execute(
            """
            INSERT INTO moderation_decisions (
                id, user_id, sub_account, plan, purpose, decision, categories, scores,
                moderators, unavailable, text_sha256, texts, generation_id, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            """,
            uuid.UUID(record.id),
            record.user_id,
            record.sub_account,
            record.plan,
            record.purpose.value,
            record.decision.value,
            list(record.categories),
            record.scores,
            record.moderators,
            list(record.unavailable),
            record.text_sha256,
            record.texts,
            uuid.UUID(record.generation_id) if record.generation_id else None,
            record.created_at,
        )

    async def suspend(self, user_id: str, until: datetime) -> datetime:
        """Suspend the user until `until` (a longer running suspension is kept);
        returns the suspension's end."""
        value: datetime = await self._pool.fetchval(
            """
            INSERT INTO moderation_users (user_id, suspended_until, suspensions)
            VALUES ($1, $2, 1)
            ON CONFLICT (user_id) DO UPDATE
               SET suspended_until = GREATEST(moderation_users.suspended_until, $2),
                   suspensions = moderation_users.suspensions + 1,
                   updated_at = now()
            RETURNING suspended_until
            """,
            user_id,
            until,
        )
        return value

    async def lift_suspension(self, user_id: str) -> bool:
        """End the user's suspension now; False if they had none running."""
        status = await self._pool.execute(
            "UPDATE moderation_users SET suspended_until = NULL, updated_at = now() "
            "WHERE user_id = $1 AND suspended_until IS NOT NULL",
            user_id,
        )
        return bool(status.endswith(" 1"))

    async def generation_failed(self, user_id: str, at: datetime) -> None:
        """Count one failed generation of the user."""
        await self._pool.execute(
            """
            INSERT INTO moderation_users (user_id, failed_generations, last_failed_at)
            VALUES ($1, 1, $2)
            ON CONFLICT (user_id) DO UPDATE
               SET failed_generations = moderation_users.failed_generations + 1,
                   last_failed_at = GREATEST(moderation_users.last_failed_at, $2),
                   updated_at = now()
            """,
            user_id,
            at,
        )

    async def user_state(self, user_id: str) -> UserAbuseState | None:
        """The user's counters and suspension; None if nothing was ever counted."""
        row = await self._pool.fetchrow(
            "SELECT * FROM moderation_users WHERE user_id = $1", user_id
        )
        return None if row is None else _state_from_row(row)

    async def get(self, decision_id: str) -> DecisionRecord | None:
        """One decision by id; None for an unknown or malformed id."""
        try:
            key = uuid.UUID(decision_id)
        except ValueError:
            return None
        row = await self._pool.fetchrow("SELECT * FROM moderation_decisions WHERE id = $1", key)
        return None if row is None else _record_from_row(row)

    async def list_decisions(
        self,
        *,
        decision: Decision | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[DecisionRecord]:
        """Decisions newest first: one kind (all but allowed ones when None), one user's
        or everyone's, from `since` on."""
        conditions: list[str] = []
        args: list[Any] = []
        if decision is None:
            conditions.append("decision <> 'allowed'")
        else:
            args.append(decision.value)
            conditions.append(f"decision = ${len(args)}")
        if user_id is not None:
            args.append(user_id)
            conditions.append(f"user_id = ${len(args)}")
        if since is not None:
            args.append(since)
            conditions.append(f"created_at >= ${len(args)}")
        args.append(limit)
        # The conditions are fixed fragments with numbered parameters; values are never
        # formatted into the SQL.
        query = (
            "SELECT * FROM moderation_decisions WHERE "  # noqa: S608
            + " AND ".join(conditions)
            + f" ORDER BY created_at DESC, id DESC LIMIT ${len(args)}"
        )
        rows = await self._pool.fetch(query, *args)
        return [_record_from_row(row) for row in rows]
