"""The credits ledger (SQL lives here only). Every change is an appended row; the
balance is their sum. Whether a user can pay is decided in domain/credits.py over the
facts read here; submit reserves inside its unit of work, under the user's advisory
lock, so balances never go negative across replicas."""

from __future__ import annotations

import uuid
from datetime import datetime

from imagegen.domain.credits import Balance, CreditFacts, Reservation, next_period, period_start
from imagegen.repositories.db import Executor, transaction


class CreditLedger:
    """Appends and sums ledger rows."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def ensure_allowance(self, user_id: str, allowance: int, now: datetime) -> None:
        """Open the current period: expire what is left of older allowances and grant
        this period's (once; caller holds the user's lock)."""
        start = period_start(now)
        exists = await self._db.fetchval(
            "SELECT 1 FROM credit_ledger WHERE user_id = $1 AND kind = 'allowance' "
            "AND period_start = $2",
            user_id,
            start,
        )
        if exists:
            return
        left = await self._db.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM credit_ledger "
            "WHERE user_id = $1 AND bucket = 'allowance'",
            user_id,
        )
        if left > 0:
            await self._db.execute(
                "INSERT INTO credit_ledger (user_id, kind, bucket, amount, period_start, note) "
                "VALUES ($1, 'expire', 'allowance', $2, $3, 'unused allowance expired')",
                user_id,
                -int(left),
                start,
            )
        await self._db.execute(
            "INSERT INTO credit_ledger (user_id, kind, bucket, amount, period_start, note) "
            "VALUES ($1, 'allowance', 'allowance', $2, $3, 'monthly allowance')",
            user_id,
            allowance,
            start,
        )

    async def facts(self, user_id: str, now: datetime) -> CreditFacts:
        """The user's credits left by bucket, and whether this period's allowance is granted."""
        rows = await self._db.fetch(
            "SELECT bucket, coalesce(sum(amount), 0) AS left, "
            "bool_or(kind = 'allowance' AND period_start = $2) AS current "
            "FROM credit_ledger WHERE user_id = $1 GROUP BY bucket",
            user_id,
            period_start(now),
        )
        left = {r["bucket"]: int(r["left"]) for r in rows}
        return CreditFacts(
            allowance_left=left.get("allowance", 0),
            purchased_left=left.get("purchased", 0),
            allowance_granted=any(r["current"] for r in rows),
        )

    async def reserve(self, user_id: str, generation_id: str, reservation: Reservation) -> None:
        """Hold a job's price as decided by domain.credits.plan_reservation."""
        for bucket, amount in (
            ("allowance", reservation.from_allowance),
            ("purchased", reservation.from_purchased),
        ):
            if amount:
                await self._db.execute(
                    "INSERT INTO credit_ledger (user_id, kind, bucket, amount, generation_id) "
                    "VALUES ($1, 'reserve', $2, $3, $4)",
                    user_id,
                    bucket,
                    -amount,
                    uuid.UUID(generation_id),
                )

    async def spend(self, user_id: str, reservation: Reservation, note: str) -> None:
        """Charge, for good, a price that belongs to no job (a prompt enhancement): rows of
        kind `reserve` without a generation, which nothing ever settles or refunds, so
        the balance and its check stay as they are (caller holds the user's lock)."""
        for bucket, amount in (
            ("allowance", reservation.from_allowance),
            ("purchased", reservation.from_purchased),
        ):
            if amount:
                await self._db.execute(
                    "INSERT INTO credit_ledger (user_id, kind, bucket, amount, note) "
                    "VALUES ($1, 'reserve', $2, $3, $4)",
                    user_id,
                    bucket,
                    -amount,
                    note,
                )

    async def settle(self, user_id: str, generation_id: str, charged: int) -> None:
        """Keep `charged` of the job's reservation and refund the rest, purchased credits
        first (they never expire). Called once, inside the job's finishing unit of work."""
        rows = await self._db.fetch(
            "SELECT bucket, -sum(amount) AS held FROM credit_ledger "
            "WHERE generation_id = $1 AND kind = 'reserve' GROUP BY bucket",
            uuid.UUID(generation_id),
        )
        held = {r["bucket"]: int(r["held"]) for r in rows}
        to_refund = max(sum(held.values()) - charged, 0)
        for bucket in ("purchased", "allowance"):
            amount = min(held.get(bucket, 0), to_refund)
            if amount:
                await self._db.execute(
                    "INSERT INTO credit_ledger (user_id, kind, bucket, amount, generation_id) "
                    "VALUES ($1, 'refund', $2, $3, $4) ON CONFLICT DO NOTHING",
                    user_id,
                    bucket,
                    amount,
                    uuid.UUID(generation_id),
                )
                to_refund -= amount

    async def grant(self, user_id: str, credits: int, note: str = "") -> int:
        """Add purchased or granted credits (they never expire); returns the new balance."""
        async with transaction(self._db) as conn:
            await conn.execute(
                "INSERT INTO credit_ledger (user_id, kind, bucket, amount, note) "
                "VALUES ($1, 'grant', 'purchased', $2, $3)",
                user_id,
                credits,
                note,
            )
            value = await conn.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM credit_ledger WHERE user_id = $1", user_id
            )
            return int(value)

    async def balance(self, user_id: str, now: datetime) -> Balance:
        """The user's balance by bucket, and what their unfinished jobs hold."""
        row = await self._db.fetchrow(
            """
            SELECT coalesce(sum(amount), 0) AS available,
                   coalesce(sum(amount) FILTER (WHERE bucket = 'allowance'), 0) AS allowance,
                   coalesce(sum(amount) FILTER (WHERE bucket = 'purchased'), 0) AS purchased,
                   coalesce(-sum(amount) FILTER (
                       WHERE kind IN ('reserve', 'refund') AND generation_id IN (
                           SELECT id FROM generations
                            WHERE user_id = $1 AND state IN ('queued', 'running'))), 0)
                       AS reserved
              FROM credit_ledger WHERE user_id = $1
            """,
            user_id,
        )
        start = period_start(now)
        return Balance(
            available=int(row["available"]),
            allowance_remaining=int(row["allowance"]),
            purchased=int(row["purchased"]),
            reserved=int(row["reserved"]),
            period_start=start,
            period_reset=next_period(start),
        )
