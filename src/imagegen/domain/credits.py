"""Credit periods, balances and the decisions on them: pure functions over facts.

The ledger (repositories/credits.py) appends rows and sums them into CreditFacts; whether
a user can pay, and from which bucket, is decided here. Two buckets: the monthly
allowance (unused credits expire at the end of the period) and purchased or granted
credits (never expire). A reservation spends the allowance first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from imagegen.domain.errors import InsufficientCredits


def period_start(now: datetime) -> datetime:
    """The start of the calendar month (UTC) that `now` falls in.

    Periods are calendar months for every user (not per-user anniversaries). A job that
    reserved allowance credits before a rollover and is refunded after it returns them to
    the new period's allowance bucket, where they expire a month late."""
    moment = now.astimezone(UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_period(start: datetime) -> datetime:
    """The start of the period after the one starting at `start`."""
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


@dataclass(frozen=True)
class Balance:
    """What a user has, by bucket, and what is held by running jobs."""

    available: int
    allowance_remaining: int
    purchased: int
    reserved: int
    period_start: datetime
    period_reset: datetime


@dataclass(frozen=True)
class CreditFacts:
    """A user's ledger summed by bucket at the moment of a decision."""

    allowance_left: int
    purchased_left: int
    #: whether the current period's allowance is already granted (credited to the ledger)
    allowance_granted: bool = True


@dataclass(frozen=True)
class Reservation:
    """How a job's price is held: allowance first, the rest from purchased credits."""

    from_allowance: int
    from_purchased: int


def check_affordable(
    facts: CreditFacts, credits: int, monthly_allowance: int, now: datetime
) -> None:
    """IMG_006 if the user surely cannot pay `credits`, counting the period's allowance
    when it is not granted yet (a read-only check before expensive work)."""
    allowance = facts.allowance_left if facts.allowance_granted else monthly_allowance
    have = max(allowance, 0) + max(facts.purchased_left, 0)
    if credits > have:
        raise _insufficient(credits, have, now)


def plan_reservation(facts: CreditFacts, credits: int, now: datetime) -> Reservation:
    """Hold `credits` from the allowance first, then from purchased credits; IMG_006 if
    the two together fall short."""
    from_allowance = min(max(facts.allowance_left, 0), credits)
    from_purchased = credits - from_allowance
    if from_purchased > max(facts.purchased_left, 0):
        have = max(facts.allowance_left, 0) + max(facts.purchased_left, 0)
        raise _insufficient(credits, have, now)
    return Reservation(from_allowance=from_allowance, from_purchased=from_purchased)


def _insufficient(credits: int, have: int, now: datetime) -> InsufficientCredits:
    reset = next_period(period_start(now))
    return InsufficientCredits(
        f"this request costs {credits} credits and you have {have}; your monthly "
        f"allowance resets at {reset.isoformat()}",
        metadata={"required": str(credits), "reset_time": reset.isoformat()},
    )
