"""WaitGeneration's budget: the request's timeout, the deployment's default and ceiling,
and the caller's gRPC deadline."""

from __future__ import annotations

from datetime import timedelta

import pytest

from imagegen.domain.errors import InvalidRequest
from imagegen.services.generations.wait import DEADLINE_MARGIN, WaitSettings, wait_budget

SETTINGS = WaitSettings(default=timedelta(seconds=30), maximum=timedelta(seconds=120))


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (None, 30.0),
        (timedelta(0), 30.0),
        (timedelta(seconds=5), 5.0),
        (timedelta(seconds=120), 120.0),
        (timedelta(seconds=121), 120.0),
        (timedelta(days=3650), 120.0),
        (timedelta(microseconds=1), 0.000001),
    ],
)
def test_timeout_default_and_ceiling(requested: timedelta | None, expected: float) -> None:
    assert wait_budget(requested, None, SETTINGS) == pytest.approx(expected)


def test_the_callers_deadline_bounds_it_with_a_margin() -> None:
    assert wait_budget(timedelta(seconds=60), 10.0, SETTINGS) == pytest.approx(
        10.0 - DEADLINE_MARGIN
    )
    # A short deadline keeps a share of itself, not the whole margin.
    assert 0 < wait_budget(timedelta(seconds=60), 0.4, SETTINGS) < 0.4
    # A deadline already passed (or about to): answer at once.
    assert wait_budget(timedelta(seconds=60), 0.0, SETTINGS) == 0.0
    assert wait_budget(timedelta(seconds=60), -1.0, SETTINGS) == 0.0
    # A deadline further away than the timeout changes nothing.
    assert wait_budget(timedelta(seconds=5), 100.0, SETTINGS) == pytest.approx(5.0)


@pytest.mark.parametrize("requested", [timedelta(microseconds=-1), timedelta(seconds=-30)])
def test_a_negative_timeout_is_img_003_on_timeout(requested: timedelta) -> None:
    with pytest.raises(InvalidRequest) as caught:
        wait_budget(requested, None, SETTINGS)
    assert caught.value.field == "timeout"
