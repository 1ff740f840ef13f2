"""Plan-limit and storage-quota decisions: pure functions over facts.

The repositories only read the facts (counts, the oldest timestamps in a window, bytes
used); what they mean for a request is decided here, with the message and the RetryInfo
delay a caller sees. Submit reads the facts and decides inside one transaction, under
the user's advisory lock, so every replica decides on the same counts.

A count only has to tell "below the cap" from "at it", so it is read up to the cap and
no further: its cost is bounded by the plan, never by the user's history.

Order, as docs/plans-and-prices.md states it: requests per hour, per day, then
concurrent generations; credits come after (domain/credits.py), the storage quota last.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from imagegen.domain.errors import RateLimited, StorageQuotaExceeded
from imagegen.domain.plans import PlanLimits

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
#: The shortest wait a RetryInfo asks for.
MIN_RETRY_AFTER = timedelta(seconds=1)
#: A running job's end is not known in advance: ask the caller to look again soon.
CONCURRENT_RETRY_AFTER = timedelta(seconds=5)


@dataclass(frozen=True)
class RequestCounts:
    """A user's accepted requests and active jobs, counted at `now` (the database's clock)
    up to the plan's caps (`counted_up_to`): past a cap the exact number does not matter."""

    now: datetime
    #: requests accepted in the hour before `now`, the newest ones up to the hourly cap
    last_hour: int
    #: requests accepted in the day before `now`, the newest ones up to the daily cap
    last_day: int
    #: jobs queued or running, up to the concurrent cap
    active: int
    #: when the oldest request counted in `last_hour` was accepted (None if none was):
    #: once it leaves the window, one more request fits
    oldest_in_hour: datetime | None = None
    #: when the oldest request counted in `last_day` was accepted (None if none was)
    oldest_in_day: datetime | None = None


@dataclass(frozen=True)
class CountCaps:
    """How far a repository needs to count for `check_request_limits` to decide:
    each plan cap, and 0 where the plan sets none (nothing to count)."""

    hour: int
    day: int
    active: int


def counted_up_to(limits: PlanLimits) -> CountCaps:
    """The counts `check_request_limits` needs for `limits`: up to each cap."""

    def cap(value: int | None) -> int:
        return 0 if value is None else max(value, 0)

    return CountCaps(
        hour=cap(limits.requests_per_hour),
        day=cap(limits.requests_per_day),
        active=cap(limits.concurrent),
    )


def window_retry_after(oldest: datetime | None, window: timedelta, now: datetime) -> timedelta:
    """When the oldest request of a full window leaves it: the earliest moment another
    request fits. Never less than MIN_RETRY_AFTER."""
    if oldest is None:
        return MIN_RETRY_AFTER
    return max(oldest + window - now, MIN_RETRY_AFTER)


def _windows(
    counts: RequestCounts, limits: PlanLimits
) -> tuple[tuple[int, int | None, datetime | None, timedelta, str], ...]:
    """(count, cap, oldest counted, window, name) of the hour's and the day's windows,
    in the order they are checked."""
    return (
        (counts.last_hour, limits.requests_per_hour, counts.oldest_in_hour, HOUR, "hour"),
        (counts.last_day, limits.requests_per_day, counts.oldest_in_day, DAY, "day"),
    )


def check_request_limits(counts: RequestCounts, limits: PlanLimits) -> None:
    """IMG_005 (RateLimited, with its retry delay) when one more request would pass the
    plan's requests per hour or per day, or its concurrent generations; None caps are
    unlimited."""
    for count, cap, oldest, window, name in _windows(counts, limits):
        if cap is not None and count >= cap:
            wait = window_retry_after(oldest, window, counts.now)
            raise RateLimited(
                f"your plan allows {cap} requests per {name}; try again in "
                f"{wait.total_seconds():.0f}s",
                retry_after=wait,
                metadata={"limit": f"requests_per_{name}", "cap": str(cap)},
            )
    if limits.concurrent is not None and counts.active >= limits.concurrent:
        raise RateLimited(
            f"your plan allows {limits.concurrent} generation(s) at a time; wait for one to finish",
            retry_after=CONCURRENT_RETRY_AFTER,
            metadata={"limit": "concurrent", "cap": str(limits.concurrent)},
        )


def check_batch_request_limits(counts: RequestCounts, limits: PlanLimits, jobs: int) -> None:
    """IMG_005 unless both the hour's and the day's windows have room for all `jobs` of
    a batch (each counts as a request). The concurrent cap does not refuse a batch: its
    jobs wait queued until the plan's concurrency lets them start. The RetryInfo delay
    is when the oldest request counted leaves the window: the earliest moment anything
    more fits (a large batch may need longer). A batch larger than the cap itself never
    fits: the message says to split it."""
    for count, cap, oldest, window, name in _windows(counts, limits):
        if cap is None or count + jobs <= cap:
            continue
        metadata = {"limit": f"requests_per_{name}", "cap": str(cap), "requested": str(jobs)}
        if jobs > cap:
            raise RateLimited(
                f"this batch of {jobs} jobs is more than your plan's {cap} requests per "
                f"{name}; split it into batches of at most {cap}",
                retry_after=window,
                metadata=metadata,
            )
        wait = window_retry_after(oldest, window, counts.now)
        raise RateLimited(
            f"your plan allows {cap} requests per {name} and {cap - min(count, cap)} are "
            f"left, fewer than this batch's {jobs} jobs; try again in at least "
            f"{wait.total_seconds():.0f}s",
            retry_after=wait,
            metadata=metadata,
        )


def check_storage_room(quota_bytes: int | None, used_bytes: int) -> None:
    """IMG_008 when a user is already at or over `quota_bytes` (None: no quota): no
    image, however small, would fit. The read-only check at submit, before a job, a
    rate-limit slot or a charge; the exact decision is `check_storage_quota` when the
    image is recorded."""
    if quota_bytes is None or used_bytes < quota_bytes:
        return
    raise StorageQuotaExceeded(
        f"your storage quota of {quota_bytes} bytes is full ({used_bytes} used); purge "
        "images to free space",
        metadata={"quota_bytes": str(quota_bytes), "used_bytes": str(used_bytes)},
    )


def check_storage_quota(quota_bytes: int | None, used_bytes: int, size_bytes: int) -> None:
    """IMG_008 (StorageQuotaExceeded) when storing `size_bytes` more would take the user
    past `quota_bytes` (None: no quota). Reaching the quota exactly is allowed."""
    if quota_bytes is None:
        return
    if used_bytes + size_bytes > quota_bytes:
        raise StorageQuotaExceeded(
            f"storing this image ({size_bytes} bytes) would pass your storage quota of "
            f"{quota_bytes} bytes ({used_bytes} used); purge images to free space",
            metadata={"quota_bytes": str(quota_bytes), "used_bytes": str(used_bytes)},
        )
