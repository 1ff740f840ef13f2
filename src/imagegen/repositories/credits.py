"""The credits ledger (SQL lives here only). Every change is an appended row; the
ledger takes no UPDATE or DELETE. A trigger (migrations/0003_counters.sql) keeps the
user's `credit_balances` row equal to the ledger's sums by bucket in the same
transaction, so a balance is one row read however long the history is. Whether a user
can pay, and what a period's opening adds, is decided in domain/credits.py over the
facts read here; writes that decide run inside a unit of work with the balance row
locked, so balances never go negative across replicas."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from imagegen.domain.credits import (
    CreditFacts,
    Held,
    PeriodOpening,
    Reservation,
    open_period,
    plan_refund,
)
from imagegen.repositories.db import Executor, transaction

#: Credits held by the user's queued and running jobs, by bucket: a reservation's rows
#: less its refunds (a job is settled in the transaction that ends it, so an unfinished
#: job has no refund yet). Bounded by the user's active jobs
#: (generations_user_active_idx), never by their history.
_HELD_SQL = """
SELECT coalesce(-sum(l.amount) FILTER (WHERE l.bucket = 'allowance'), 0) AS held_allowance,
       coalesce(-sum(l.amount) FILTER (WHERE l.bucket = 'purchased'), 0) AS held_purchased
  FROM generations g
  JOIN credit_ledger l ON l.generation_id = g.id AND l.kind IN ('reserve', 'refund')
 WHERE g.user_id = $1 AND g.state IN ('queued', 'running')
"""


def _facts(row: asyncpg.Record | None) -> CreditFacts:
    if row is None:
        return CreditFacts(allowance_left=0, purchased_left=0, allowance_period=None)
    return CreditFacts(
        allowance_left=int(row["allowance_credits"]),
        purchased_left=int(row["purchased_credits"]),
        allowance_period=row["allowance_period_start"],
    )


class CreditLedger:
    """Appends ledger rows and reads the per-user sums kept beside them."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def facts(self, user_id: str) -> CreditFacts:
        """The user's credits left by bucket and the latest period granted (one row)."""
        row = await self._db.fetchrow(
            "SELECT allowance_credits, purchased_credits, allowance_period_start "
            "FROM credit_balances WHERE user_id = $1",
            user_id,
        )
        return _facts(row)

    async def balance_facts(self, user_id: str) -> tuple[CreditFacts, Held]:
        """The user's sums by bucket and what their unfinished jobs hold, in one round
        trip; domain.credits.balance_of makes the balance of them."""
        row = await self._db.fetchrow(
            f"""
            SELECT b.allowance_credits, b.purchased_credits, b.allowance_period_start,
                   h.held_allowance, h.held_purchased
              FROM ({_HELD_SQL}) h
              LEFT JOIN credit_balances b ON b.user_id = $1
            """,  # noqa: S608 - _HELD_SQL is a constant of this module, never input
            user_id,
        )
        assert row is not None, "an aggregate always answers one row"
        held = Held(allowance=int(row["held_allowance"]), purchased=int(row["held_purchased"]))
        return (_facts(row) if row["allowance_credits"] is not None else _facts(None)), held

    async def open_period(self, user_id: str, allowance: int, now: datetime) -> CreditFacts:
        """Lock the user's balance row until the transaction ends and open the period
        `now` falls in (domain.credits.open_period: expire what is left of earlier
        allowances, grant `allowance`); returns the facts after it. Inside a unit of
        work: concurrent openings wait for the lock, so a period opens once."""
        row = await self._db.fetchrow(
            """
            INSERT INTO credit_balances AS b (user_id) VALUES ($1)
            ON CONFLICT (user_id) DO UPDATE SET user_id = b.user_id
            RETURNING allowance_credits, purchased_credits, allowance_period_start
            """,
            user_id,
        )
        opening = open_period(_facts(row), allowance, now)
        await self._append_opening(user_id, opening)
        return opening.after

    async def _append_opening(self, user_id: str, opening: PeriodOpening) -> None:
        if opening.expire is not None:
            await self._db.execute(
                "INSERT INTO credit_ledger (user_id, kind, bucket, amount, period_start, note) "
                "VALUES ($1, 'expire', 'allowance', $2, $3, 'unused allowance expired')",
                user_id,
                opening.expire,
                opening.period_start,
            )
        if opening.grant is not None:
            await self._db.execute(
                "INSERT INTO credit_ledger (user_id, kind, bucket, amount, period_start, note) "
                "VALUES ($1, 'allowance', 'allowance', $2, $3, 'monthly allowance')",
                user_id,
                opening.grant,
                opening.period_start,
            )

    async def reserve(self, user_id: str, generation_id: str, reservation: Reservation) -> None:
        """Hold a job's price as decided by domain.credits.plan_reservation."""
        await self._db.execute(
            """
            INSERT INTO credit_ledger (user_id, kind, bucket, amount, generation_id)
            SELECT $1::text, 'reserve', bucket, -amount, $4::uuid
              FROM (VALUES ('allowance', $2::integer), ('purchased', $3::integer))
                   AS held(bucket, amount)
             WHERE amount <> 0
            """,
            user_id,
            reservation.from_allowance,
            reservation.from_purchased,
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

    async def settle(
        self, user_id: str, generation_id: str, charged: int, *, allowance: int, now: datetime
    ) -> None:
        """Keep `charged` of the job's reservation and refund the rest, purchased credits
        first (domain.credits.plan_refund). Allowance credits go back to the current
        period, which is opened first (with `allowance`, the job's plan's monthly
        credits) so that a refund after a rollover never expires with the old period.
        Called once, inside the job's finishing unit of work."""
        row = await self._db.fetchrow(
            "SELECT coalesce(-sum(amount) FILTER (WHERE bucket = 'allowance'), 0) AS allowance, "
            "coalesce(-sum(amount) FILTER (WHERE bucket = 'purchased'), 0) AS purchased "
            "FROM credit_ledger WHERE generation_id = $1 AND kind = 'reserve'",
            uuid.UUID(generation_id),
        )
        assert row is not None, "an aggregate always answers one row"
        refund = plan_refund(
            Held(allowance=int(row["allowance"]), purchased=int(row["purchased"])), charged
        )
        if refund.allowance:
            await self.open_period(user_id, allowance, now)
        if refund.total:
            await self._db.execute(
                """
                INSERT INTO credit_ledger (user_id, kind, bucket, amount, generation_id)
                SELECT $1::text, 'refund', bucket, amount, $4::uuid
                  FROM (VALUES ('purchased', $2::integer), ('allowance', $3::integer))
                       AS refund(bucket, amount)
                 WHERE amount <> 0
                ON CONFLICT DO NOTHING
                """,
                user_id,
                refund.purchased,
                refund.allowance,
                uuid.UUID(generation_id),
            )

    async def grant(self, user_id: str, credits: int, note: str = "") -> int:
        """Add purchased or granted credits (they never expire); returns the new sum of
        the user's ledger."""
        async with transaction(self._db) as conn:
            await conn.execute(
                "INSERT INTO credit_ledger (user_id, kind, bucket, amount, note) "
                "VALUES ($1, 'grant', 'purchased', $2, $3)",
                user_id,
                credits,
                note,
            )
            value = await conn.fetchval(
                "SELECT allowance_credits + purchased_credits FROM credit_balances "
                "WHERE user_id = $1",
                user_id,
            )
            return int(value)
