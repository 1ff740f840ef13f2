"""The RPC telemetry interceptor (api/rpc_telemetry.py) against a real grpc.aio server on
loopback: `rpc.server.call.duration` by method and status code, SERVER spans that
continue the caller's traceparent, and a stream the caller abandons ends cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from imagegen.v1 import generation_pb2, generation_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from imagegen.api.errors import abort_with
from imagegen.api.interceptors import ErrorInterceptor
from imagegen.api.rpc_telemetry import RpcTelemetryInterceptor
from imagegen.domain.errors import NotFound
from imagegen.telemetry import UnrecordedTracerProvider

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = ("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01")
GET = "imagegen.v1.ImageGenerationService/GetGeneration"
WATCH = "imagegen.v1.ImageGenerationService/WatchGeneration"


class Servicer(generation_pb2_grpc.ImageGenerationServiceServicer):
    """GetGeneration answers, refuses or breaks by the name asked; WatchGeneration
    streams as fast as it can until the caller goes away. Both record the trace context
    they ran in."""

    def __init__(self) -> None:
        self.seen_contexts: list[trace.SpanContext] = []
        self.stream_closed = asyncio.Event()

    async def GetGeneration(
        self, request: generation_pb2.GetGenerationRequest, context: Any
    ) -> generation_pb2.GetGenerationResponse:
        self.seen_contexts.append(trace.get_current_span().get_span_context())
        if request.name == "generations/missing":
            await abort_with(context, NotFound("no such generation"))
        if request.name == "generations/bug":
            raise RuntimeError("a bug")
        return generation_pb2.GetGenerationResponse(
            generation=generation_pb2.Generation(name=request.name)
        )

    async def WatchGeneration(
        self, request: generation_pb2.WatchGenerationRequest, context: Any
    ) -> AsyncIterator[generation_pb2.WatchGenerationResponse]:
        self.seen_contexts.append(trace.get_current_span().get_span_context())
        try:
            sequence = 0
            while True:
                sequence += 1
                yield generation_pb2.WatchGenerationResponse(
                    event=generation_pb2.GenerationEvent(sequence=sequence)
                )
                # No await of its own between events: the RPC's task spends its time in
                # grpc's send, so that is where the caller's cancellation lands.
        finally:
            self.stream_closed.set()


class SpanEnded(SpanProcessor):
    """Set when a server span ends: the interceptor records the call's duration just
    before it ends the span, so a test waits for this instead of polling the metrics."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self.event.set()


@dataclass
class Served:
    servicer: Servicer
    stub: Any
    health: Any
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    span_ended: asyncio.Event

    def durations(self) -> dict[tuple[str, str], int]:
        """Call counts of rpc.server.call.duration by (rpc.method, status code)."""
        data = self.metrics.get_metrics_data()
        counts: dict[tuple[str, str], int] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != "rpc.server.call.duration":
                        continue
                    assert metric.unit == "s"
                    for point in metric.data.data_points:
                        assert isinstance(point, HistogramDataPoint)
                        attributes = point.attributes or {}
                        assert attributes["rpc.system.name"] == "grpc"
                        key = (
                            str(attributes["rpc.method"]),
                            str(attributes["rpc.response.status_code"]),
                        )
                        counts[key] = counts.get(key, 0) + point.count
        return counts


@contextlib.asynccontextmanager
async def serve(tracer_provider: trace.TracerProvider | None = None) -> AsyncIterator[Served]:
    spans = InMemorySpanExporter()
    ended = SpanEnded()
    if tracer_provider is None:
        sdk = TracerProvider()
        sdk.add_span_processor(SimpleSpanProcessor(spans))
        sdk.add_span_processor(ended)
        tracer_provider = sdk
    metrics = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[metrics]).get_meter("test")
    servicer = Servicer()  # type: ignore[abstract]
    server = grpc.aio.server(
        interceptors=[
            RpcTelemetryInterceptor(tracer_provider.get_tracer("test"), meter),
            ErrorInterceptor(),
        ]
    )
    generation_pb2_grpc.add_ImageGenerationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
    )
    try:
        yield Served(
            servicer,
            generation_pb2_grpc.ImageGenerationServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            spans,
            metrics,
            ended.event,
        )
    finally:
        await channel.close()
        await server.stop(None)


async def test_calls_are_counted_and_timed_by_method_and_status_code() -> None:
    async with serve() as served:
        get = served.stub.GetGeneration
        await get(generation_pb2.GetGenerationRequest(name="generations/g1"))
        await get(generation_pb2.GetGenerationRequest(name="generations/g2"))
        for name, code in (
            ("generations/missing", grpc.StatusCode.NOT_FOUND),
            ("generations/bug", grpc.StatusCode.INTERNAL),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await get(generation_pb2.GetGenerationRequest(name=name))
            assert caught.value.code() == code
        await served.health.Check(health_pb2.HealthCheckRequest(service=""))

        assert served.durations() == {
            (GET, "OK"): 2,
            (GET, "NOT_FOUND"): 1,
            (GET, "INTERNAL"): 1,
            ("grpc.health.v1.Health/Check", "OK"): 1,
        }
        spans = {
            (s.name, s.attributes["rpc.response.status_code"]): s
            for s in served.spans.get_finished_spans()
        }
    # Health checks are counted, not traced.
    assert set(spans) == {(GET, "OK"), (GET, "NOT_FOUND"), (GET, "INTERNAL")}
    # A refusal is the caller's business; an internal error is the server's.
    assert spans[(GET, "NOT_FOUND")].status.status_code is StatusCode.UNSET
    assert spans[(GET, "INTERNAL")].status.status_code is StatusCode.ERROR
    assert spans[(GET, "INTERNAL")].attributes["error.type"] == "INTERNAL"
    for span in spans.values():
        assert span.kind is SpanKind.SERVER
        assert span.attributes["rpc.system.name"] == "grpc"
        assert span.attributes["rpc.method"] == GET


async def test_the_server_span_continues_the_callers_traceparent() -> None:
    async with serve() as served:
        await served.stub.GetGeneration(
            generation_pb2.GetGenerationRequest(name="generations/g1"), metadata=(TRACEPARENT,)
        )
        [span] = served.spans.get_finished_spans()
    assert format(span.context.trace_id, "032x") == CALLER_TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == CALLER_SPAN_ID
    # The servicer ran inside it.
    assert served.servicer.seen_contexts == [span.context]


async def test_a_stream_the_caller_abandons_ends_cancelled_in_its_own_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with serve() as served:
        call = served.stub.WatchGeneration(
            generation_pb2.WatchGenerationRequest(name="generations/g1"), metadata=(TRACEPARENT,)
        )
        await call.read()
        # What every client does once it has the terminal event: go away mid-stream.
        call.cancel()
        await asyncio.wait_for(served.servicer.stream_closed.wait(), timeout=10)
        await asyncio.wait_for(served.span_ended.wait(), timeout=10)
        assert served.durations().get((WATCH, "CANCELLED")) == 1
        [span] = served.spans.get_finished_spans()
    assert span.attributes["rpc.response.status_code"] == "CANCELLED"
    # Before, OpenTelemetry's interceptor logged two ERRORs here ("Failed to detach context").
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_without_an_exporter_nothing_records_yet_the_trace_ids_flow() -> None:
    async with serve(UnrecordedTracerProvider()) as served:
        await served.stub.GetGeneration(
            generation_pb2.GetGenerationRequest(name="generations/g1"), metadata=(TRACEPARENT,)
        )
        await served.stub.GetGeneration(generation_pb2.GetGenerationRequest(name="generations/g2"))
        assert served.durations() == {(GET, "OK"): 2}
    continued, fresh = served.servicer.seen_contexts
    # The caller's context, sampling flag and all, as it came.
    assert format(continued.trace_id, "032x") == CALLER_TRACE_ID
    assert format(continued.span_id, "016x") == CALLER_SPAN_ID
    assert continued.trace_flags.sampled
    # No caller's trace: a fresh, valid, unsampled one, so log lines still share an id.
    assert fresh.is_valid and not fresh.trace_flags.sampled
    assert format(fresh.trace_id, "032x") != CALLER_TRACE_ID
