"""Telemetry: spans reach the current provider, metrics render as Prometheus text,
log lines are JSON with the trace id, and the alert rules name real metrics."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from imagegen.telemetry import JsonLogFormatter, _span_exporters, setup_telemetry

ROOT = Path(__file__).resolve().parents[2]


def test_spans_go_to_the_newest_setup() -> None:
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    setup_telemetry(span_exporter=first, env={})
    telemetry = setup_telemetry(span_exporter=second, env={})
    with (
        telemetry.tracer.start_as_current_span("parent") as parent,
        telemetry.tracer.start_as_current_span("child"),
    ):
        pass
    spans = {s.name: s for s in second.get_finished_spans()}
    assert spans["child"].context.trace_id == parent.get_span_context().trace_id
    assert first.get_finished_spans() == ()


def test_metrics_render_outcomes_and_alert_rules_name_real_metrics() -> None:
    telemetry = setup_telemetry(env={})
    metrics = telemetry.generation_metrics
    metrics.record_outcome("local", "failed", "IMG_002", 0.4)
    metrics.record_outcome("local", "completed", "", 0.2)
    metrics.register_queue_observer(lambda: (2, 7.0))
    telemetry.moderation_metrics.decision_made("blocked", "generate", ["sexual"])
    telemetry.moderation_metrics.moderator_unavailable("openai")
    text = telemetry.metrics_text()[0].decode()
    assert re.search(r'imagegen_generations_total\{code="IMG_002".*outcome="failed".*\} 1\.0', text)
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    rules = yaml.safe_load((ROOT / "deploy" / "alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\bimagegen_[a-z_]+", rule["expr"]):
                assert name in exposed, f"{rule['alert']} uses {name}, which /metrics does not show"


def test_log_lines_are_json_with_the_trace_id() -> None:
    telemetry = setup_telemetry(env={})
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("imagegen.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with telemetry.tracer.start_as_current_span("work") as span:
            logger.info(
                "generation finished", extra={"event": "generation.outcome", "code": "IMG_002"}
            )
    finally:
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "generation finished"
    assert entry["code"] == "IMG_002"
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")


def test_otlp_only_when_an_endpoint_is_configured() -> None:
    assert _span_exporters({}) == []
    assert (
        _span_exporters(
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
        )
        == []
    )
    chosen = _span_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert [type(e).__name__ for e in chosen] == ["OTLPSpanExporter"]


def test_moderation_metrics_carry_no_text_or_user_and_the_top_user_gauge_decays() -> None:
    telemetry = setup_telemetry(env={})
    moderation = telemetry.moderation_metrics
    now = datetime.now(UTC)
    moderation.decision_made("blocked", "template", ["sexual", "violence"])
    moderation.user_blocks("mallory", 12, now - timedelta(minutes=59))
    moderation.user_blocks("eve", 3, now - timedelta(minutes=5))
    text = telemetry.metrics_text()[0].decode()
    assert re.search(
        r'imagegen_moderation_decisions_total\{decision="blocked".*purpose="template".*\} 1\.0',
        text,
    )
    assert re.search(r'imagegen_moderation_categories_total\{category="violence"', text)
    assert re.search(r"imagegen_moderation_top_user_blocks\{.*\} 12\.0", text)
    assert "mallory" not in text and "eve" not in text
    # An hour after a user's latest block their count no longer counts.
    assert moderation.top_user_blocks(now + timedelta(minutes=2)) == 3
    assert moderation.top_user_blocks(now + timedelta(hours=1)) == 0
