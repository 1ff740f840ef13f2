"""Retention rules without I/O: the plans file's periods, which rows are due, and when a
row that is not due is looked at again."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from imagegen.config import ConfigError, Settings
from imagegen.domain.plans import PlanLimits, PlanTable
from imagegen.domain.retention import RetentionKind, RetentionRules
from imagegen.services.retention import GcReport, Totals

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def table(**plans: dict[str, object]) -> PlanTable:
    return PlanTable.from_json(json.dumps({"plans": plans}))


def test_defaults_and_the_plans_file() -> None:
    default = PlanTable.default().limits_for("pro")
    assert (default.deleted_image_days, default.event_log_days, default.upload_days) == (30, 7, 30)
    plans = table(
        free={"deleted_image_retention_days": 1, "upload_retention_days": 0},
        pro={"deleted_image_retention_days": None, "event_log_retention_days": 90},
    )
    free, pro = plans.limits_for("free"), plans.limits_for("pro")
    # Absent: the default; null: forever; 0: at the next pass.
    assert (free.deleted_image_retention, free.event_log_retention, free.upload_retention) == (
        DAY,
        7 * DAY,
        timedelta(0),
    )
    assert (pro.deleted_image_retention, pro.event_log_retention, pro.upload_retention) == (
        None,
        90 * DAY,
        30 * DAY,
    )
    with pytest.raises(ValueError, match="deleted_image_days must be 0 or more"):
        table(free={"deleted_image_retention_days": -1})
    with pytest.raises(ValueError, match="0 or more"):
        PlanLimits(1, 1, 1, upload_days=-3)


def test_due_rows_and_when_the_others_are_looked_at_again() -> None:
    rules = RetentionRules(
        table(
            free={"deleted_image_retention_days": 30},
            pro={"deleted_image_retention_days": 90},
            enterprise={"deleted_image_retention_days": None},
        )
    )
    kind = RetentionKind.DELETED_IMAGES
    assert rules.shortest(kind) == 30 * DAY
    # At its period's end exactly, a row is due.
    assert rules.verdict(kind, "free", NOW - 30 * DAY, NOW).due
    assert rules.due_before(kind, "free", NOW) == NOW - 30 * DAY
    # A pro row 40 days old is looked at again when it becomes due: the walk reads rows
    # whose look time is a shortest period old, so its look time is its due time less that.
    pro = rules.verdict(kind, "pro", NOW - 40 * DAY, NOW)
    assert not pro.due
    assert pro.look_again_from == NOW - 40 * DAY + 90 * DAY - 30 * DAY
    # Kept forever: looked at again one shortest period from now (the plan may change).
    forever = rules.verdict(kind, "enterprise", NOW - 400 * DAY, NOW)
    assert (forever.due, forever.look_again_from) == (False, NOW)
    assert rules.due_before(kind, "enterprise", NOW) is None
    # An unknown plan gets the most restrictive configured one (free), as for every limit.
    assert rules.period(kind, "no-such-plan") == 30 * DAY
    assert rules.period(kind, "") == 30 * DAY


def test_a_kind_every_plan_keeps_forever_is_never_walked() -> None:
    rules = RetentionRules(
        table(free={"event_log_retention_days": None}, pro={"event_log_retention_days": None})
    )
    assert rules.shortest(RetentionKind.EVENT_LOGS) is None
    assert rules.shortest(RetentionKind.UPLOADS) == 30 * DAY


def test_gc_settings() -> None:
    base = {"IMAGEGEN_DATA_DIR": "/tmp/x"}
    settings = Settings.from_env(base)
    assert settings.gc.interval == timedelta(seconds=300)
    assert (settings.gc.batch_size, settings.gc.orphan_grace) == (500, timedelta(hours=1))
    assert settings.gc.sweep_interval == DAY
    assert Settings.from_env({**base, "IMAGEGEN_GC_INTERVAL": "0"}).gc.interval is None
    for name, value, message in (
        ("IMAGEGEN_GC_ORPHAN_GRACE", "59", "at least 60 seconds"),
        ("IMAGEGEN_GC_BATCH_SIZE", "0", "at least 1"),
        ("IMAGEGEN_GC_BATCH_SIZE", "10001", "at most 10000"),
        ("IMAGEGEN_GC_SWEEP_INTERVAL", "0", "above 0"),
        ("IMAGEGEN_GC_INTERVAL", "-1", "at least 0"),
        ("IMAGEGEN_GC_INTERVAL", "soon", "must be a number"),
    ):
        with pytest.raises(ConfigError, match=message):
            Settings.from_env({**base, name: value})


def test_the_report_prints_counts_and_bytes_by_kind() -> None:
    report = GcReport(
        dry_run=True,
        deleted_images=Totals(2, 2048),
        uploads=Totals(1, 10),
        event_logs=3,
        events=Totals(40, 5000),
        blobs=Totals(3, 2058),
        swept=True,
        orphan_blobs=Totals(1, 7),
    )
    text = "\n".join(report.lines())
    assert text.startswith("would remove (dry run, nothing changed):")
    assert "soft-deleted images    2 rows" in text and "2,048 bytes" in text
    assert "40 events of 3 jobs" in text
    assert "orphaned blobs         1 blobs" in text
    done = GcReport(dry_run=False, blobs_pending=2)
    lines = done.lines()
    assert lines[0] == "removed:"
    assert any("sweep was not due" in line for line in lines)
    assert any("2 blob deletion(s) failed" in line for line in lines)
