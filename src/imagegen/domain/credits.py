"""Credit periods, balances and the decisions on them: pure functions over facts.

The ledger (repositories/credits.py) appends rows; a per-user balance row beside it
holds their sums by bucket (kept by the database in the same transaction), and those
sums are the CreditFacts decided on here. Two buckets: the monthly allowance (unused
credits expire when the next period opens) and purchased or granted credits (never
expire). A reservation spends the allowance first; a refund returns purchased credits
first.

A period is opened (what is left of earlier allowances expires, this period's is
granted) by the first ledger write of the period that needs it: a submit's
reservation, or a refund of allowance credits. A refund after a rollover therefore
lands in the new period's allowance, whatever the order of events. Reads before that
(GetCreditBalance) show the balance as the opening will make it.
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
class CreditFacts:
    """A user's ledger summed by bucket at the moment of a decision."""

    #: sum of the allowance bucket (net of reservations still held)
    allowance_left: int
    #: sum of the purchased bucket (net of reservations still held)
    purchased_left: int
    #: the latest period whose allowance is granted; None before the first grant
    allowance_period: datetime | None = None

    def opened(self, now: datetime) -> bool:
        """Whether the period `now` falls in is already opened (its allowance granted)."""
        return self.allowance_period is not None and self.allowance_period >= period_start(now)


@dataclass(frozen=True)
class PeriodOpening:
    """The ledger rows that open the current period, and the facts once they are added.
    Nothing to add when the period is already open (`expire` and `grant` are None)."""

    period_start: datetime
    #: the (negative) amount of earlier allowance that expires; None: no row
    expire: int | None
    #: this period's allowance; None: already granted
    grant: int | None
    after: CreditFacts


def open_period(facts: CreditFacts, monthly_allowance: int, now: datetime) -> PeriodOpening:
    """What opening the period `now` falls in adds to the ledger: the expiry of what is
    left of earlier allowances (a negative remainder stays: it is owed), then this
    period's grant. Nothing when it is already open."""
    start = period_start(now)
    if facts.opened(now):
        return PeriodOpening(start, None, None, facts)
    expire = -facts.allowance_left if facts.allowance_left > 0 else None
    allowance = facts.allowance_left + (expire or 0) + monthly_allowance
    after = CreditFacts(allowance, facts.purchased_left, start)
    return PeriodOpening(start, expire, monthly_allowance, after)


@dataclass(frozen=True)
class Held:
    """Credits reserved by a user's unfinished jobs, by the bucket they came from."""

    allowance: int = 0
    purchased: int = 0

    @property
    def total(self) -> int:
        """Credits held from both buckets."""
        return self.allowance + self.purchased


@dataclass(frozen=True)
class Balance:
    """What a user has, by bucket, and what is held by running jobs, as
    `proto/imagegen/v1/usage.proto` (CreditBalance) defines them: `available` is
    `allowance_remaining + purchased - reserved`, and each bucket still counts the
    credits its unfinished jobs hold (they come back if the job fails)."""

    available: int
    allowance_remaining: int
    purchased: int
    reserved: int
    period_start: datetime
    period_reset: datetime


def balance_of(facts: CreditFacts, held: Held, monthly_allowance: int, now: datetime) -> Balance:
    """The balance GetCreditBalance shows: the current period as its opening makes it
    (so a new user sees the month's allowance before the first submit), with the
    credits held by unfinished jobs counted in their buckets and as reserved."""
    opened = open_period(facts, monthly_allowance, now).after
    allowance_remaining = opened.allowance_left + held.allowance
    purchased = opened.purchased_left + held.purchased
    start = period_start(now)
    return Balance(
        available=allowance_remaining + purchased - held.total,
        allowance_remaining=allowance_remaining,
        purchased=purchased,
        reserved=held.total,
        period_start=start,
        period_reset=next_period(start),
    )


@dataclass(frozen=True)
class Reservation:
    """How a job's price is held: allowance first, the rest from purchased credits."""

    from_allowance: int
    from_purchased: int


def check_affordable(facts: CreditFacts, credits: int, now: datetime) -> None:
    """IMG_006 if the user surely cannot pay `credits`; `facts` as the period's opening
    makes them (`open_period(...).after`): a read-only check before expensive work."""
    have = max(facts.allowance_left, 0) + max(facts.purchased_left, 0)
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


def plan_reservations(facts: CreditFacts, prices: list[int], now: datetime) -> list[Reservation]:
    """Hold the prices of several jobs decided together (a batch), one reservation per
    job in order: IMG_006 naming their total if the two buckets together fall short, so
    either every job is paid for or none is. Each job takes from the allowance while it
    lasts, then from purchased credits, as one job would."""
    plan_reservation(facts, sum(prices), now)
    allowance_left = max(facts.allowance_left, 0)
    reservations = []
    for price in prices:
        from_allowance = min(allowance_left, price)
        allowance_left -= from_allowance
        reservations.append(
            Reservation(from_allowance=from_allowance, from_purchased=price - from_allowance)
        )
    return reservations


def plan_refund(held: Held, charged: int) -> Held:
    """What a finished job's settlement gives back: all it held less `charged`,
    purchased credits first (they never expire)."""
    to_refund = max(held.total - charged, 0)
    purchased = min(held.purchased, to_refund)
    return Held(allowance=min(held.allowance, to_refund - purchased), purchased=purchased)


def _insufficient(credits: int, have: int, now: datetime) -> InsufficientCredits:
    reset = next_period(period_start(now))
    return InsufficientCredits(
        f"this request costs {credits} credits and you have {have}; your monthly "
        f"allowance resets at {reset.isoformat()}",
        metadata={"required": str(credits), "reset_time": reset.isoformat()},
    )
