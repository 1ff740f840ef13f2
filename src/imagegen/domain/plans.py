"""Plan limits. The table is configuration (a JSON file); this module only applies it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MB = 1_000_000


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

        return cls(
            {
                name: PlanLimits(
                    cap(limits.get("requests_per_hour")),
                    cap(limits.get("requests_per_day")),
                    cap(limits.get("concurrent")),
                    cap(limits.get("storage_bytes")),
                    int(limits.get("monthly_credits", 0)),
                    cap(limits.get("max_streams")),
                )
                for name, limits in data["plans"].items()
            }
        )

    @classmethod
    def load(cls, path: Path | None) -> PlanTable:
        return cls.default() if path is None else cls.from_json(path.read_text())

    def limits_for(self, plan: str) -> PlanLimits:
        """The plan's limits; an unknown plan gets the most restrictive configured one."""
        if plan in self.plans:
            return self.plans[plan]
        return self.plans.get("free") or PlanLimits(0, 0, 0, max_streams=0)
