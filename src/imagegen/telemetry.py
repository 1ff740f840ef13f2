"""OpenTelemetry for a served process: traces, metrics (Prometheus text at /metrics)
and JSON log lines that carry the current trace and span ids.

Exporters follow the standard OTEL_* variables: spans go to OTLP when
OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set, over gRPC or HTTP as
OTEL_EXPORTER_OTLP_PROTOCOL (or ..._TRACES_PROTOCOL) says, nowhere otherwise.

With no exporter, spans are not recorded at all (see `UnrecordedTracerProvider`): a
recorded span that nothing exports is CPU spent for nothing. Trace context still
flows: an incoming `traceparent` is carried into the job and to the providers, and
log lines carry its trace id (or a fresh one per RPC when the caller sent none).

Library instrumentations (httpx, aiobotocore) patch process-wide code, so they are
installed once, with a tracer provider that delegates to whichever Telemetry was set
up last; several servers in one test process each see their own spans while they are
current. PostgreSQL queries are traced by the pool itself (repositories/db.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class _Current:
    provider: trace.TracerProvider = trace.NoOpTracerProvider()


class _DelegatingTracer(trace.Tracer):
    """A tracer whose spans go to the provider current when each span starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs

    def _target(self) -> trace.Tracer:
        return _Current.provider.get_tracer(*self._args, **self._kwargs)

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._target().start_span(*args, **kwargs)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]  # same calls, plainer manager
        self, *args: Any, **kwargs: Any
    ) -> Iterator[trace.Span]:
        with self._target().start_as_current_span(*args, **kwargs) as span:
            yield span


class _DelegatingTracerProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _DelegatingTracer(*args, **kwargs)


class UnrecordedTracer(trace.NoOpTracer):
    """Starts no span of its own: inside a trace it hands back the current span (as the
    API's no-op tracer does), so the caller's trace context, sampling flag included,
    flows on unchanged; outside any trace it starts a non-recording root span with
    fresh ids, so the log lines of an RPC or job without a caller's trace still share
    one trace id."""

    def __init__(self) -> None:
        self._ids = RandomIdGenerator()

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        current = trace.get_current_span(context)
        span_context = current.get_span_context()
        if span_context.is_valid:
            # Ending it is a no-op, so `with start_as_current_span(...)` leaves it be.
            return current if not current.is_recording() else trace.NonRecordingSpan(span_context)
        return trace.NonRecordingSpan(
            trace.SpanContext(
                self._ids.generate_trace_id(),
                self._ids.generate_span_id(),
                is_remote=False,
                trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
            )
        )


class UnrecordedTracerProvider(trace.TracerProvider):
    """The tracer provider of a process that exports no spans (see UnrecordedTracer).

    Chosen over the SDK's provider with an ALWAYS_OFF sampler, which also records
    nothing but still makes ids and objects for every span and marks the context it
    forwards as not sampled even when the caller sampled it (bench/span_bench.py)."""

    def __init__(self) -> None:
        self._tracer = UnrecordedTracer()

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return self._tracer


class _Instrumentation:
    lock = threading.Lock()
    done = False


def _instrument_libraries() -> None:
    with _Instrumentation.lock:
        if _Instrumentation.done:
            return
        from opentelemetry.instrumentation.aiobotocore import AioBotocoreInstrumentor
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        # PostgreSQL is traced by our pool (repositories/db.py), not by an instrumentor.
        provider = _DelegatingTracerProvider()
        HTTPXClientInstrumentor().instrument(tracer_provider=provider)
        AioBotocoreInstrumentor().instrument(  # type: ignore[no-untyped-call]
            tracer_provider=provider
        )
        _Instrumentation.done = True


class GenerationMetrics:
    """The generation instruments; also the pipeline's observer."""

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self._outcomes = meter.create_counter(
            "imagegen_generations",
            unit="1",
            description="Generations by outcome, provider and code",
        )
        self._duration = meter.create_histogram(
            "imagegen_generation_duration",
            unit="s",
            description="Time from a job's start to its end",
            explicit_bucket_boundaries_advisory=[
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                20,
                30,
                60,
                120,
                300,
            ],
        )
        self._in_flight = meter.create_up_down_counter(
            "imagegen_jobs_in_flight", unit="1", description="Jobs running in this process"
        )
        self._credits = meter.create_counter(
            "imagegen_credits_charged", unit="1", description="Credits charged for delivered images"
        )
        self._meter = meter

    def job_started(self, provider: str) -> None:
        self._in_flight.add(1, {"provider": provider})

    def job_finished(self, provider: str) -> None:
        self._in_flight.add(-1, {"provider": provider})

    def record_outcome(self, provider: str, outcome: str, code: str, duration_s: float) -> None:
        self._outcomes.add(1, {"provider": provider, "outcome": outcome, "code": code or "none"})
        self._duration.record(duration_s, {"provider": provider, "outcome": outcome})

    def credits_charged(self, provider: str, credits: int) -> None:
        if credits:
            self._credits.add(credits, {"provider": provider})

    def register_queue_observer(self, read: Callable[[], tuple[int, float]]) -> None:
        """Gauges for queue depth and oldest queued job's age, read at each scrape."""

        def depth(_options: otel_metrics.CallbackOptions) -> Iterator[otel_metrics.Observation]:
            yield otel_metrics.Observation(read()[0])

        def age(_options: otel_metrics.CallbackOptions) -> Iterator[otel_metrics.Observation]:
            yield otel_metrics.Observation(read()[1])

        self._meter.create_observable_gauge(
            "imagegen_queue_depth",
            [depth],
            unit="1",
            description="Jobs waiting in the queue (all replicas), read every few seconds",
        )
        self._meter.create_observable_gauge(
            "imagegen_queue_oldest_age",
            [age],
            unit="s",
            description="How long the oldest queued job has waited",
        )


class ModerationMetrics:
    """The moderation instruments; also the moderation service's observer. Labels are
    decisions, purposes, categories and moderator ids: never a text, never a user id."""

    #: users tracked at once for the top-user gauge; the oldest are dropped past this
    MAX_TRACKED_USERS = 10_000

    def __init__(self, meter: otel_metrics.Meter, window: timedelta = timedelta(hours=1)) -> None:
        self._decisions = meter.create_counter(
            "imagegen_moderation_decisions",
            unit="1",
            description="Moderation decisions by decision (allowed, flagged, blocked, "
            "unavailable, suspended) and purpose",
        )
        self._categories = meter.create_counter(
            "imagegen_moderation_categories",
            unit="1",
            description="Categories that decided a flagged or blocked request",
        )
        self._unavailable = meter.create_counter(
            "imagegen_moderation_moderator_unavailable",
            unit="1",
            description="Calls to a moderator that could not answer",
        )
        self._window = window
        #: user id -> (blocks within the window as counted in the database at their
        #: latest block, time of that block); held in memory, exported only as a max
        self._recent: dict[str, tuple[int, datetime]] = {}
        self._lock = threading.Lock()
        meter.create_observable_gauge(
            "imagegen_moderation_top_user_blocks",
            [self._observe_top_user],
            description="The most blocked requests one user had within the last hour, as "
            "counted across replicas in the database at that user's latest block",
        )

    def decision_made(self, decision: str, purpose: str, categories: Sequence[str]) -> None:
        self._decisions.add(1, {"decision": decision, "purpose": purpose})
        for category in categories:
            self._categories.add(1, {"decision": decision, "category": category})

    def moderator_unavailable(self, moderator: str) -> None:
        self._unavailable.add(1, {"moderator": moderator})

    def moderators_configured(self, moderators: Sequence[str]) -> None:
        """Start each moderator's unavailability count at 0, so the series exists (and an
        alert's rate over it works) before the first failure."""
        for moderator in moderators:
            self._unavailable.add(0, {"moderator": moderator})

    def user_blocks(self, user_id: str, blocks_in_window: int, at: datetime) -> None:
        with self._lock:
            self._recent.pop(user_id, None)
            self._recent[user_id] = (blocks_in_window, at)
            while len(self._recent) > self.MAX_TRACKED_USERS:
                self._recent.pop(next(iter(self._recent)))

    def top_user_blocks(self, now: datetime | None = None) -> int:
        """The highest per-user block count whose latest block is still in the window."""
        moment = now or datetime.now(UTC)
        with self._lock:
            start = moment - self._window
            for user_id in [u for u, (_, at) in self._recent.items() if at <= start]:
                del self._recent[user_id]
            return max((count for count, _ in self._recent.values()), default=0)

    def _observe_top_user(
        self, _options: otel_metrics.CallbackOptions
    ) -> Iterator[otel_metrics.Observation]:
        yield otel_metrics.Observation(self.top_user_blocks())


class Telemetry:
    """Tracer and meter providers of one served process, and what reads them."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider,
        meter_provider: MeterProvider,
        registry: CollectorRegistry,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._registry = registry
        self.tracer = tracer_provider.get_tracer("imagegen")
        self.meter = meter_provider.get_meter("imagegen")
        self.generation_metrics = GenerationMetrics(self.meter)
        self.moderation_metrics = ModerationMetrics(self.meter)

    @property
    def records_spans(self) -> bool:
        """Whether spans are recorded (some exporter takes them)."""
        return isinstance(self.tracer_provider, TracerProvider)

    def grpc_server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """Server spans (continuing a caller's traceparent) and `rpc.server.*` metrics."""
        from imagegen.api.rpc_telemetry import RpcTelemetryInterceptor

        return RpcTelemetryInterceptor(self.tracer, self.meter)

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition of this process's metrics."""
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._shutdown_sync)

    def _shutdown_sync(self) -> None:
        if isinstance(self.tracer_provider, TracerProvider):
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    *,
    service_name: str = "imagegen",
    span_exporter: SpanExporter | None = None,
    env: Mapping[str, str] | None = None,
) -> Telemetry:
    """Build providers from the OTEL_* variables (and an extra exporter for tests),
    make them current for the library instrumentations, and return them."""
    env = os.environ if env is None else env
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
    exporters = _span_exporters(env)
    tracer_provider: trace.TracerProvider
    if exporters or span_exporter is not None:
        # The SDK reads OTEL_TRACES_SAMPLER (default: parent-based, always on) itself.
        sdk_provider = TracerProvider(resource=resource)
        for exporter in exporters:
            sdk_provider.add_span_processor(BatchSpanProcessor(exporter))
        if span_exporter is not None:
            sdk_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        tracer_provider = sdk_provider
    else:
        tracer_provider = UnrecordedTracerProvider()
    registry = CollectorRegistry()
    # CPU, resident memory, open file descriptors and start time of this process.
    ProcessCollector(registry=registry)
    readers: Sequence[MetricReader] = [PrometheusMetricReader(registry=registry)]
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    _Current.provider = tracer_provider
    _instrument_libraries()
    return Telemetry(tracer_provider, meter_provider, registry)


#: OTLP protocols the exporters speak (OTEL_EXPORTER_OTLP_PROTOCOL's values).
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


def _span_exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    chosen = {
        name.strip().lower()
        for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip()
    }
    if chosen == {"none"}:
        return []
    exporters: list[SpanExporter] = []
    if "console" in chosen:
        exporters.append(ConsoleSpanExporter())
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if "otlp" in chosen or (not chosen and (traces_endpoint or endpoint)):
        exporters.append(_otlp_exporter(env, traces_endpoint, endpoint))
    return exporters


def _otlp_exporter(env: Mapping[str, str], traces_endpoint: str, endpoint: str) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        # The specification's default is http/protobuf; gRPC is kept as ours because
        # deployments configured before this setting was read point at gRPC port 4317.
        or "grpc"
    ).lower()
    if protocol not in OTLP_PROTOCOLS:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; "
            f"use one of {', '.join(OTLP_PROTOCOLS)}"
        )
    # The exporters read the remaining OTEL_EXPORTER_OTLP_* settings (headers, timeout,
    # compression, certificates) themselves.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        target = traces_endpoint or endpoint
        return GrpcSpanExporter(endpoint=target) if target else GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    # Per the specification, the per-signal endpoint is used as it is and the general one
    # is a base URL the signal's path is added to.
    if traces_endpoint:
        return HttpSpanExporter(endpoint=traces_endpoint)
    if endpoint:
        return HttpSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
    return HttpSpanExporter()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids."""

    _RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in vars(record).items():
            if key not in self._RESERVED and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the whole process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def span_attributes(**values: Any) -> Attributes:
    """Attributes with None values dropped."""
    return {k: v for k, v in values.items() if v is not None}
