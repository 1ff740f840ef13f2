"""OpenTelemetry collectors on loopback that speak OTLP/HTTP (protobuf at /v1/traces)
and OTLP/gRPC (TraceService.Export), keeping every span they receive."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.fakes import serve_on_loopback


@dataclass
class ReceivedSpans:
    """What a fake collector received: the spans, and how each request came."""

    spans: list[trace_pb2.Span] = field(default_factory=list)
    #: One per export request: the HTTP path and Content-Type, or "grpc".
    requests: list[str] = field(default_factory=list)
    service_names: set[str] = field(default_factory=set)

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    self.service_names.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)

    def named(self, name: str) -> list[trace_pb2.Span]:
        return [span for span in self.spans if span.name == name]


@contextlib.asynccontextmanager
async def http_collector() -> AsyncIterator[tuple[str, ReceivedSpans]]:
    """An OTLP/HTTP collector; yields its base URL (no path) and what it receives."""
    received = ReceivedSpans()

    async def traces(request: web.Request) -> web.Response:
        received.requests.append(f"{request.path} {request.content_type}")
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text="protobuf only")
        export = trace_service_pb2.ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        received.take(export)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    async with serve_on_loopback(app) as url:
        yield url, received


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: ReceivedSpans) -> None:
        self._received = received

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._received.requests.append("grpc")
        self._received.take(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.asynccontextmanager
async def grpc_collector() -> AsyncIterator[tuple[str, ReceivedSpans]]:
    """An OTLP/gRPC collector; yields its `http://host:port` endpoint and what it receives."""
    received = ReceivedSpans()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await server.stop(0)
