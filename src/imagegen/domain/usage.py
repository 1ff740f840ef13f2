"""Usage records: what each attempt of a job, or each prompt enhancement, cost and how it
ended, as stored and reported."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class UsageKind(enum.StrEnum):
    """What a usage record is for."""

    GENERATION = "generation"
    PROMPT_ENHANCEMENT = "prompt_enhancement"


@dataclass(frozen=True)
class UsageRecord:
    """What one attempt cost and how it ended."""

    user_id: str
    #: the job; "" for a record without one (a prompt enhancement)
    generation_id: str
    attempt: int
    provider: str
    model: str
    source: str
    status: str  # succeeded | failed | cancelled
    image_count: int
    credits: int
    requested_at: datetime
    error_code: str = ""
    error_message: str = ""
    cost_cents: int | None = None
    kind: UsageKind = UsageKind.GENERATION


@dataclass(frozen=True)
class UsageRow:
    """A usage record as listed and exported."""

    id: str
    generation_id: str
    attempt: int
    provider: str
    model: str
    source: str
    status: str
    image_count: int
    credits: int
    cost_cents: int | None
    error_code: str
    error_message: str
    requested_at: datetime
    completed_at: datetime
    kind: UsageKind = UsageKind.GENERATION


@dataclass(frozen=True)
class UsageTotalsRow:
    """Sums over a group of usage records."""

    key: str
    requests: int
    succeeded: int
    failed: int
    cancelled: int
    image_count: int
    credits: int
    cost_cents: int
    average_seconds: float
