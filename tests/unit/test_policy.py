"""Plan limits, credits and the storage quota decided without I/O, at their edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from imagegen.domain.credits import (
    CreditFacts,
    Held,
    Reservation,
    balance_of,
    check_affordable,
    next_period,
    open_period,
    period_start,
    plan_refund,
    plan_reservation,
)
from imagegen.domain.errors import InsufficientCredits, RateLimited, StorageQuotaExceeded
from imagegen.domain.limits import (
    CONCURRENT_RETRY_AFTER,
    MIN_RETRY_AFTER,
    CountCaps,
    RequestCounts,
    check_request_limits,
    check_storage_quota,
    check_storage_room,
    counted_up_to,
    window_retry_after,
)
from imagegen.domain.plans import PlanLimits

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)


def counts(
    hour: int = 0,
    day: int = 0,
    active: int = 0,
    oldest_in_hour: datetime | None = None,
    oldest_in_day: datetime | None = None,
) -> RequestCounts:
    return RequestCounts(NOW, hour, day, active, oldest_in_hour, oldest_in_day)


def test_requests_per_hour_allow_one_below_the_cap_and_refuse_at_it() -> None:
    limits = PlanLimits(requests_per_hour=10, requests_per_day=None, concurrent=None)
    check_request_limits(counts(hour=9, day=9), limits)
    oldest = NOW - timedelta(minutes=20)
    with pytest.raises(RateLimited) as caught:
        check_request_limits(counts(hour=10, day=10, oldest_in_hour=oldest), limits)
    error = caught.value
    # The oldest request leaves the hour window in 40 minutes.
    assert error.retry_after == timedelta(minutes=40)
    assert error.metadata == {"limit": "requests_per_hour", "cap": "10"}
    assert error.message == "your plan allows 10 requests per hour; try again in 2400s"


def test_requests_per_day_are_checked_after_the_hour() -> None:
    limits = PlanLimits(requests_per_hour=100, requests_per_day=50, concurrent=None)
    check_request_limits(counts(hour=3, day=49), limits)
    oldest = NOW - timedelta(hours=23, minutes=59, seconds=30)
    with pytest.raises(RateLimited) as caught:
        check_request_limits(counts(hour=3, day=50, oldest_in_day=oldest), limits)
    assert caught.value.retry_after == timedelta(seconds=30)
    assert caught.value.metadata["limit"] == "requests_per_day"
    # Both windows full: the hour is named first.
    both = PlanLimits(requests_per_hour=3, requests_per_day=3, concurrent=None)
    with pytest.raises(RateLimited) as caught:
        check_request_limits(counts(hour=3, day=3, oldest_in_hour=NOW), both)
    assert caught.value.metadata["limit"] == "requests_per_hour"


def test_concurrent_generations_at_their_cap() -> None:
    limits = PlanLimits(requests_per_hour=None, requests_per_day=None, concurrent=2)
    check_request_limits(counts(active=1), limits)
    with pytest.raises(RateLimited) as caught:
        check_request_limits(counts(active=2), limits)
    assert caught.value.retry_after == CONCURRENT_RETRY_AFTER
    assert caught.value.metadata == {"limit": "concurrent", "cap": "2"}


def test_unlimited_caps_never_refuse() -> None:
    unlimited = PlanLimits(requests_per_hour=None, requests_per_day=None, concurrent=None)
    check_request_limits(counts(hour=10**6, day=10**6, active=10**6), unlimited)


def test_a_zero_cap_refuses_everything_and_waits_the_minimum() -> None:
    closed = PlanLimits(requests_per_hour=0, requests_per_day=0, concurrent=0)
    with pytest.raises(RateLimited) as caught:
        check_request_limits(counts(), closed)
    assert caught.value.retry_after == MIN_RETRY_AFTER


def test_retry_after_is_never_below_a_second() -> None:
    hour = timedelta(hours=1)
    assert window_retry_after(None, hour, NOW) == MIN_RETRY_AFTER
    # The oldest request is leaving the window right now (or left it while counting).
    assert window_retry_after(NOW - hour, hour, NOW) == MIN_RETRY_AFTER
    assert window_retry_after(NOW - hour - timedelta(seconds=5), hour, NOW) == MIN_RETRY_AFTER
    assert window_retry_after(NOW - hour + timedelta(seconds=1.5), hour, NOW) == timedelta(
        seconds=1.5
    )
    assert window_retry_after(NOW, hour, NOW) == hour


def test_storage_quota_at_its_edge() -> None:
    check_storage_quota(None, 10**12, 10**9)
    check_storage_quota(1000, 600, 400)  # exactly full is allowed
    with pytest.raises(StorageQuotaExceeded) as caught:
        check_storage_quota(1000, 600, 401)
    assert caught.value.code == "IMG_008"
    assert caught.value.metadata == {"quota_bytes": "1000", "used_bytes": "600"}
    with pytest.raises(StorageQuotaExceeded):
        check_storage_quota(0, 0, 1)


def test_periods_are_calendar_months_in_utc() -> None:
    assert period_start(NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    assert next_period(datetime(2026, 12, 1, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)


def test_affordable_counts_an_allowance_not_granted_yet() -> None:
    not_granted = CreditFacts(allowance_left=0, purchased_left=1, allowance_period=None)
    opened = open_period(not_granted, 10, NOW).after
    check_affordable(opened, 11, now=NOW)
    with pytest.raises(InsufficientCredits) as caught:
        check_affordable(opened, 12, now=NOW)
    assert caught.value.metadata == {
        "required": "12",
        "reset_time": "2026-12-01T00:00:00+00:00",
    }
    assert "costs 12 credits and you have 11" in caught.value.message
    granted = CreditFacts(allowance_left=3, purchased_left=0, allowance_period=PERIOD)
    check_affordable(open_period(granted, 10, NOW).after, 3, now=NOW)
    with pytest.raises(InsufficientCredits):
        check_affordable(open_period(granted, 10, NOW).after, 4, now=NOW)


def test_a_negative_bucket_counts_as_empty() -> None:
    facts = CreditFacts(allowance_left=-5, purchased_left=2)
    check_affordable(facts, 2, now=NOW)
    with pytest.raises(InsufficientCredits) as caught:
        plan_reservation(facts, 3, NOW)
    assert "you have 2" in caught.value.message


def test_reservations_spend_the_allowance_first() -> None:
    facts = CreditFacts(allowance_left=3, purchased_left=5)
    assert plan_reservation(facts, 2, NOW) == Reservation(from_allowance=2, from_purchased=0)
    assert plan_reservation(facts, 3, NOW) == Reservation(from_allowance=3, from_purchased=0)
    assert plan_reservation(facts, 8, NOW) == Reservation(from_allowance=3, from_purchased=5)
    with pytest.raises(InsufficientCredits) as caught:
        plan_reservation(facts, 9, NOW)
    assert "costs 9 credits and you have 8" in caught.value.message
    assert plan_reservation(CreditFacts(0, 0), 0, NOW) == Reservation(0, 0)


def test_counts_are_read_up_to_each_cap_and_not_at_all_when_unlimited() -> None:
    assert counted_up_to(PlanLimits(10, 50, 1)) == CountCaps(hour=10, day=50, active=1)
    assert counted_up_to(PlanLimits(None, None, None)) == CountCaps(hour=0, day=0, active=0)
    # A count that stopped at the cap still refuses, and waits for the oldest it counted.
    limits = PlanLimits(requests_per_hour=10, requests_per_day=None, concurrent=None)
    with pytest.raises(RateLimited) as caught:
        check_request_limits(counts(hour=10, oldest_in_hour=NOW - timedelta(minutes=59)), limits)
    assert caught.value.retry_after == timedelta(minutes=1)


def test_storage_room_refuses_a_user_at_or_over_the_quota_only() -> None:
    check_storage_room(None, 10**12)
    check_storage_room(1000, 999)
    for used in (1000, 1001):
        with pytest.raises(StorageQuotaExceeded) as caught:
            check_storage_room(1000, used)
        assert caught.value.code == "IMG_008"
        assert caught.value.metadata == {"quota_bytes": "1000", "used_bytes": str(used)}


def test_opening_a_period_expires_what_is_left_and_grants_once() -> None:
    new_user = open_period(CreditFacts(0, 0, None), 50, NOW)
    assert (new_user.expire, new_user.grant) == (None, 50)
    assert new_user.after == CreditFacts(50, 0, PERIOD)
    last_month = CreditFacts(7, 5, datetime(2026, 10, 1, tzinfo=UTC))
    rollover = open_period(last_month, 50, NOW)
    assert (rollover.period_start, rollover.expire, rollover.grant) == (PERIOD, -7, 50)
    assert rollover.after == CreditFacts(50, 5, PERIOD)
    # Opened already: nothing to add, the facts stay.
    again = open_period(rollover.after, 50, NOW)
    assert (again.expire, again.grant, again.after) == (None, None, rollover.after)
    # A negative allowance (owed) is not expired: it is carried into the new period.
    owed = open_period(CreditFacts(-2, 0, datetime(2026, 10, 1, tzinfo=UTC)), 50, NOW)
    assert (owed.expire, owed.after.allowance_left) == (None, 48)


def test_a_balance_matches_every_proto_comment() -> None:
    # available = allowance_remaining + purchased - reserved (usage.proto, CreditBalance).
    def check(facts: CreditFacts, held: Held, expected: tuple[int, int, int, int]) -> None:
        balance = balance_of(facts, held, 50, NOW)
        got = (
            balance.available,
            balance.allowance_remaining,
            balance.purchased,
            balance.reserved,
        )
        assert got == expected
        assert balance.available == (
            balance.allowance_remaining + balance.purchased - balance.reserved
        )
        assert (balance.period_start, balance.period_reset) == (PERIOD, next_period(PERIOD))

    # A new user sees the month's allowance before their first submit.
    check(CreditFacts(0, 0, None), Held(), (50, 50, 0, 0))
    # During a reservation of 3 (2 from the allowance, 1 bought): the ledger is net of
    # it; the buckets still count it, and it is reserved.
    check(CreditFacts(0, 4, PERIOD), Held(allowance=2, purchased=1), (4, 2, 5, 3))
    # After settlement (charged): nothing reserved.
    check(CreditFacts(0, 4, PERIOD), Held(), (4, 0, 4, 0))
    # After a rollover, not yet opened: last month's leftover is gone, this month's shown.
    check(CreditFacts(9, 4, datetime(2026, 10, 1, tzinfo=UTC)), Held(), (54, 50, 4, 0))
    # ...with a job holding credits reserved last month: they come back into this one.
    check(
        CreditFacts(9, 4, datetime(2026, 10, 1, tzinfo=UTC)),
        Held(allowance=2),
        (54, 52, 4, 2),
    )


def test_a_refund_returns_purchased_credits_first() -> None:
    held = Held(allowance=3, purchased=2)
    assert plan_refund(held, 0) == held
    assert plan_refund(held, 1) == Held(allowance=2, purchased=2)
    assert plan_refund(held, 3) == Held(allowance=0, purchased=2)
    assert plan_refund(held, 4) == Held(allowance=0, purchased=1)
    assert plan_refund(held, 5) == Held()
    assert plan_refund(held, 9) == Held(), "never more than was held"
