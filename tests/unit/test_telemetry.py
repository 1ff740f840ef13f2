"""Telemetry: spans reach the current provider (and none is recorded when nothing
exports them), metrics render as Prometheus text with HELP and TYPE, log lines are JSON
with the trace id, the OTLP protocol is chosen by the OTEL_* variables, and the alert
rules name real metrics."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

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


def exporter_modules(env: dict[str, str]) -> list[str]:
    return [type(e).__module__ for e in _span_exporters(env)]


def test_the_otlp_protocol_follows_the_general_then_the_traces_variable() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    grpc_exporter = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    http_exporter = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    # gRPC unless told otherwise (what this service always spoke).
    assert exporter_modules(endpoint) == [grpc_exporter]
    assert exporter_modules({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == [
        http_exporter
    ]
    assert exporter_modules(
        {
            **endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        }
    ) == [grpc_exporter]
    # OTEL_TRACES_EXPORTER=otlp with no endpoint: the exporter's own default address.
    assert exporter_modules({"OTEL_TRACES_EXPORTER": "otlp"}) == [grpc_exporter]
    assert exporter_modules({"OTEL_TRACES_EXPORTER": "console"}) == [
        "opentelemetry.sdk.trace.export"
    ]


def test_with_no_exporter_no_span_records_and_the_callers_context_flows_on() -> None:
    telemetry = setup_telemetry(env={})
    assert not telemetry.records_spans
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with telemetry.tracer.start_as_current_span(
        "rpc", context=propagate.extract({"traceparent": caller})
    ) as rpc:
        assert not rpc.is_recording()
        with telemetry.tracer.start_as_current_span("child") as child:
            assert not child.is_recording()
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
    # Passed on as it came, the caller's sampling decision included.
    assert carrier["traceparent"] == caller

    with telemetry.tracer.start_as_current_span("root") as root:
        assert not root.is_recording()
        context = trace.get_current_span().get_span_context()
        # A trace of its own for the log lines, not sampled downstream.
        assert context.is_valid and not context.trace_flags.sampled
    with telemetry.tracer.start_as_current_span("another root") as other:
        assert other.get_span_context().trace_id != context.trace_id


def test_every_metric_family_has_help_and_type_and_process_metrics_are_there() -> None:
    telemetry = setup_telemetry(env={})
    telemetry.generation_metrics.record_outcome("local", "completed", "", 0.2)
    telemetry.generation_metrics.job_started("local")
    telemetry.generation_metrics.credits_charged("local", 3)
    telemetry.generation_metrics.register_queue_observer(lambda: (1, 2.0))
    text = telemetry.metrics_text()[0].decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for family in families.values():
        assert family.documentation.strip(), f"{family.name} has no HELP text"
        assert family.type != "unknown", f"{family.name} has no TYPE"
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "imagegen_queue_depth",
        "imagegen_queue_oldest_age_seconds",
    ):
        assert name in families, sorted(families)
