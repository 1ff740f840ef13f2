"""Batch decisions without I/O, at their edges: the batch's size, refusals naming their
spec, the request limits with room for every job, the credits of all jobs decided
together, and what makes two batch requests the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from imagegen.domain.batches import about_spec, batch_fingerprint, check_batch_size
from imagegen.domain.credits import CreditFacts, Reservation, plan_reservations
from imagegen.domain.errors import (
    ContentBlocked,
    InsufficientCredits,
    InvalidRequest,
    RateLimited,
)
from imagegen.domain.limits import RequestCounts, check_batch_request_limits
from imagegen.domain.models import GenerationSpec, Size
from imagegen.domain.plans import PlanLimits

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def counts(hour: int = 0, day: int = 0, active: int = 0) -> RequestCounts:
    oldest = NOW - timedelta(minutes=20)
    return RequestCounts(NOW, hour, day, active, oldest, oldest)


def test_a_batch_holds_one_to_the_maximum_of_specs() -> None:
    check_batch_size(1, 50)
    check_batch_size(50, 50)
    with pytest.raises(InvalidRequest) as caught:
        check_batch_size(51, 50)
    assert caught.value.metadata == {"field": "specs", "limit": "50", "specs": "51"}
    with pytest.raises(InvalidRequest) as caught:
        check_batch_size(0, 50)
    assert caught.value.field == "specs"


def test_a_refusal_inside_about_spec_names_the_spec() -> None:
    with pytest.raises(InvalidRequest) as invalid, about_spec(3):
        raise InvalidRequest("prompt is empty", field="prompt")
    assert invalid.value.field == "specs[3].prompt"
    assert invalid.value.metadata == {"field": "specs[3].prompt", "index": "3"}
    assert invalid.value.message == str(invalid.value) == "specs[3]: prompt is empty"

    with pytest.raises(InvalidRequest) as whole, about_spec(0):
        raise InvalidRequest("bad spec")
    assert whole.value.field == "specs[0]"

    with pytest.raises(ContentBlocked) as blocked, about_spec(7):
        raise ContentBlocked("blocked", categories=("violence",))
    assert blocked.value.metadata == {"categories": "violence", "index": "7"}

    with pytest.raises(ValueError), about_spec(1):
        raise ValueError("not a refusal: left alone")


def test_a_batch_needs_room_for_every_job_in_the_hour_and_the_day() -> None:
    limits = PlanLimits(requests_per_hour=10, requests_per_day=20, concurrent=1)
    # Exactly the room left fits; the concurrent cap refuses no batch.
    check_batch_request_limits(counts(hour=6, day=6, active=5), limits, 4)
    with pytest.raises(RateLimited) as caught:
        check_batch_request_limits(counts(hour=7, day=7), limits, 4)
    assert caught.value.metadata == {
        "limit": "requests_per_hour",
        "cap": "10",
        "requested": "4",
    }
    # The earliest anything more fits: the oldest counted request leaves the hour.
    assert caught.value.retry_after == timedelta(minutes=40)
    with pytest.raises(RateLimited) as caught:
        check_batch_request_limits(counts(hour=0, day=17), limits, 4)
    assert caught.value.metadata["limit"] == "requests_per_day"


def test_a_batch_larger_than_a_cap_is_told_to_split() -> None:
    limits = PlanLimits(requests_per_hour=10, requests_per_day=None, concurrent=None)
    with pytest.raises(RateLimited) as caught:
        check_batch_request_limits(counts(), limits, 11)
    assert "split it into batches of at most 10" in caught.value.message
    unlimited = PlanLimits(requests_per_hour=None, requests_per_day=None, concurrent=None)
    check_batch_request_limits(counts(hour=10**6, day=10**6), unlimited, 1000)


def test_the_credits_of_a_batch_are_decided_together() -> None:
    facts = CreditFacts(allowance_left=5, purchased_left=4)
    reservations = plan_reservations(facts, [2, 2, 2, 3], NOW)
    # The allowance first, job by job, then purchased credits.
    assert reservations == [
        Reservation(2, 0),
        Reservation(2, 0),
        Reservation(1, 1),
        Reservation(0, 3),
    ]
    with pytest.raises(InsufficientCredits) as caught:
        plan_reservations(facts, [2, 2, 2, 4], NOW)
    assert caught.value.metadata["required"] == "10"
    # An allowance overdrawn by an earlier month counts as none.
    assert plan_reservations(CreditFacts(-3, 2), [1, 1], NOW) == [
        Reservation(0, 1),
        Reservation(0, 1),
    ]


def test_two_batch_requests_are_the_same_only_with_the_same_specs_in_order() -> None:
    a = GenerationSpec(prompt="a", size=Size(256, 256))
    b = GenerationSpec(prompt="b", size=Size(256, 256))
    assert batch_fingerprint([a, b], "") == batch_fingerprint([a, b], "")
    assert batch_fingerprint([a, b], "") != batch_fingerprint([b, a], "")
    assert batch_fingerprint([a, b], "") != batch_fingerprint([a], "")
    assert batch_fingerprint([a], "") != batch_fingerprint([a], "https://x.test/")
