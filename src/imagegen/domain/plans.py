"""Plan limits and retention periods. The table is configuration (a JSON file); this
module only applies it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

MB = 1_000_000

#: Days a soft-deleted image stays before the reaper purges it, unless the plan says.
DEFAULT_DELETED_IMAGE_DAYS = 30
#: Days a finished job keeps its whole event log before it is compacted, unless the plan says.
DEFAULT_EVENT_LOG_DAYS = 7
#: Days an upload nothing keeps stays before it is purged, unless the plan says.
DEFAULT_UPLOAD_DAYS = 30


@dataclass(frozen=True)
class PlanLimits:
    """A plan's caps; None means unlimited."""

    requests_per_hour: int | None
    requests_per_day: int | None
    concurrent: int | None
    #: bytes of stored images (soft-deleted ones count until purged)
    storage_bytes: int | None = None
    #: credits granted at the start of each monthly period; unused ones expire
    monthly_credits: int = 0
    #: GenerateImage and WatchGeneration streams open at once, counted per replica
    max_streams: int | None = None
    #: days a soft-deleted image stays before it is purged; None keeps it until purged by
    #: hand (PurgeImage)
    deleted_image_days: int | None = DEFAULT_DELETED_IMAGE_DAYS
    #: days a finished job keeps its whole event log; then only its QUEUED, IMAGE_READY
    #: and terminal events stay. None keeps every event
    event_log_days: int | None = DEFAULT_EVENT_LOG_DAYS
    #: days an upload (an edit source or mask the caller supplied) stays once nothing keeps
    #: it: not a favourite, no tags, no live image made from it, no unfinished job using
    #: it. None keeps uploads until deleted
    upload_days: int | None = DEFAULT_UPLOAD_DAYS

    def __post_init__(self) -> None:
        for name in ("deleted_image_days", "event_log_days", "upload_days"):
            days = getattr(self, name)
            if days is not None and days < 0:
                raise ValueError(f"{name} must be 0 or more days (null keeps forever)")

    @property
    def deleted_image_retention(self) -> timedelta | None:
        """How long a soft-deleted image stays; None: until purged by hand."""
        return _days(self.deleted_image_days)

    @property
    def event_log_retention(self) -> timedelta | None:
        """How long a finished job keeps its whole event log; None: forever."""
        return _days(self.event_log_days)

    @property
    def upload_retention(self) -> timedelta | None:
        """How long an upload that nothing keeps stays; None: until deleted."""
        return _days(self.upload_days)


def _days(days: int | None) -> timedelta | None:
    return None if days is None else timedelta(days=days)


@dataclass(frozen=True)
class PlanTable:
    """Limits by plan name."""

    plans: dict[str, PlanLimits]

    @classmethod
    def default(cls) -> PlanTable:
        # The table in docs/plans-and-prices.md (tests/unit/test_docs.py keeps them equal).
        return cls(
            {
                "free": PlanLimits(10, 50, 1, 500 * MB, monthly_credits=50, max_streams=10),
                "basic": PlanLimits(50, 500, 2, 5_000 * MB, monthly_credits=500, max_streams=20),
                "pro": PlanLimits(
                    200, 2000, 5, 50_000 * MB, monthly_credits=2000, max_streams=50
                ),
                "enterprise": PlanLimits(
                    None, None, 10, None, monthly_credits=20000, max_streams=200
                ),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PlanTable:
        data = json.loads(text)

        def cap(value: object) -> int | None:
            return None if value is None else int(str(value))

        def days(limits: dict[str, object], key: str, default: int) -> int | None:
            # Absent: the default period; null: kept forever.
            return cap(limits[key]) if key in limits else default

        return cls(
            {
                name: PlanLimits(
                    cap(limits.get("requests_per_hour")),
                    cap(limits.get("requests_per_day")),
                    cap(limits.get("concurrent")),
                    cap(limits.get("storage_bytes")),
                    int(limits.get("monthly_credits", 0)),
                    cap(limits.get("max_streams")),
                    deleted_image_days=days(
                        limits, "deleted_image_retention_days", DEFAULT_DELETED_IMAGE_DAYS
                    ),
                    event_log_days=days(limits, "event_log_retention_days", DEFAULT_EVENT_LOG_DAYS),
                    upload_days=days(limits, "upload_retention_days", DEFAULT_UPLOAD_DAYS),
                )
                for name, limits in data["plans"].items()
            }
        )

    @classmethod
    def load(cls, path: Path | None) -> PlanTable:
        return cls.default() if path is None else cls.from_json(path.read_text())

    def all_limits(self) -> tuple[PlanLimits, ...]:
        """Every configured plan's limits, and the ones an unknown plan gets."""
        return (*self.plans.values(), self.limits_for(""))

    def limits_for(self, plan: str) -> PlanLimits:
        """The plan's limits; an unknown plan gets the most restrictive configured one."""
        if plan in self.plans:
            return self.plans[plan]
        return self.plans.get("free") or PlanLimits(0, 0, 0, max_streams=0)
