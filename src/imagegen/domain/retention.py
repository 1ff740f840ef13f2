"""Retention: when the reaper purges a soft-deleted image or an upload nothing keeps, and
when it compacts a finished job's event log. Plain rules, no I/O; the periods are the
plan's (domain/plans.py), the plan being the one the job was submitted under (for an
image: the job that made it, or that an upload was supplied to).

The reaper looks at rows in order of a "look again" time: the moment a row's clock
started (deleted, uploaded, finished), or the last time it looked and found the row not
yet due. A row is looked at once the shortest period of any plan has passed since then,
so rows of plans with longer periods (or kept forever) are not read again on every pass:
`Verdict.look_again_from` moves a row on so that the next look falls when it becomes due.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from imagegen.domain.plans import PlanLimits, PlanTable


class RetentionKind(enum.StrEnum):
    """What the reaper removes."""

    #: soft-deleted images, purged (row and blob) after the plan's period
    DELETED_IMAGES = "deleted_images"
    #: uploads nothing keeps, purged (row and blob) once older than the plan's period
    UPLOADS = "uploads"
    #: finished jobs' event logs, compacted to the QUEUED, IMAGE_READY and terminal events
    EVENT_LOGS = "event_logs"

    def period(self, limits: PlanLimits) -> timedelta | None:
        """The plan's period for this kind; None: kept forever."""
        if self is RetentionKind.DELETED_IMAGES:
            return limits.deleted_image_retention
        if self is RetentionKind.UPLOADS:
            return limits.upload_retention
        return limits.event_log_retention


@dataclass(frozen=True)
class Verdict:
    """What to do with one candidate row."""

    #: its period has passed: remove it (if nothing else keeps it)
    due: bool
    #: when not due: the value to store as its "looked at" time, so that the next look
    #: comes when it becomes due (or one shortest period later for a row kept forever)
    look_again_from: datetime | None = None


class RetentionRules:
    """The retention periods of a plan table, per kind."""

    def __init__(self, plans: PlanTable) -> None:
        self._plans = plans

    def period(self, kind: RetentionKind, plan: str) -> timedelta | None:
        """How long rows of `kind` stay under `plan` (an unknown plan gets the most
        restrictive configured one, as for every other limit); None: forever."""
        return kind.period(self._plans.limits_for(plan))

    def shortest(self, kind: RetentionKind) -> timedelta | None:
        """The shortest period of `kind` over every plan; None when every plan keeps such
        rows forever (then the reaper need not look at them at all)."""
        periods = [kind.period(limits) for limits in self._plans.all_limits()]
        kept = [period for period in periods if period is not None]
        return min(kept) if kept else None

    def due_before(self, kind: RetentionKind, plan: str, now: datetime) -> datetime | None:
        """Rows of `kind` under `plan` whose clock started at or before this moment are
        due at `now`; None when the plan keeps them forever."""
        period = self.period(kind, plan)
        return None if period is None else now - period

    def verdict(self, kind: RetentionKind, plan: str, started: datetime, now: datetime) -> Verdict:
        """Whether a row whose clock started at `started` (deleted, uploaded, finished)
        is due at `now` under `plan`, and when to look at it again if not."""
        period = self.period(kind, plan)
        shortest = self.shortest(kind) or timedelta(0)
        if period is None:
            return Verdict(due=False, look_again_from=now)
        if started + period <= now:
            return Verdict(due=True)
        return Verdict(due=False, look_again_from=started + period - shortest)
