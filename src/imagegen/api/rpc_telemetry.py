"""The outermost server interceptor: a SERVER span per RPC and `rpc.server.call.duration`,
per OpenTelemetry's RPC conventions.

Our own rather than OpenTelemetry's gRPC instrumentation, because that one records no
metrics for grpc.aio servers, and its streaming wrapper is an async generator that holds
an attached context across `yield`: when a caller goes away mid-stream (as every client
does once it has the terminal event), grpc.aio abandons the generator, the garbage
collector closes it in another task, and detaching fails with two ERROR lines
("Failed to detach context"). Here a streaming RPC is served through the reader/writer
API (`context.write`), so the inner stream is closed, the span ended and the context
detached in the RPC's own task, whichever way the RPC ends.

Attributes (span and metric): `rpc.system.name` = grpc, `rpc.method` (fully qualified,
`imagegen.v1.ImageGenerationService/GenerateImage`) and `rpc.response.status_code`
(the gRPC code's name); `error.type` too when the code is a server error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace

from imagegen.api.interceptors import _behavior_of, _rebuild, _responses

if TYPE_CHECKING:
    _Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]

#: Codes that mean the server failed (span status ERROR), per the gRPC conventions;
#: the others are the caller's business (NOT_FOUND, INVALID_ARGUMENT...).
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

#: Seconds; unary calls take milliseconds, GenerateImage and WatchGeneration streams
#: last as long as their job.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)


class RpcTelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Times every RPC into `rpc.server.call.duration` and traces each one (health
    checks aside) in a SERVER span that continues the caller's `traceparent`."""

    def __init__(
        self,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        *,
        untraced_prefixes: Sequence[str] = ("/grpc.health.v1.",),
    ) -> None:
        self._tracer = tracer
        self._untraced_prefixes = tuple(untraced_prefixes)
        self._duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of incoming RPCs, by method and status code",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """Wrap the method's handler so its run is timed and traced."""
        handler: _Handler | None = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        traced = not method.startswith(self._untraced_prefixes)
        original = _behavior_of(handler)
        interceptor = self

        if handler.response_streaming:

            async def streaming(request: Any, context: _Context) -> None:
                # A coroutine, not a generator: grpc.aio then serves it through the
                # reader/writer API and never abandons it half-way (module docstring).
                with interceptor._observed(handler_call_details, context, traced):
                    async for response in _responses(original(request, context)):
                        await context.write(response)

            behavior: Callable[..., Any] = streaming
        else:

            async def unary(request: Any, context: _Context) -> Any:
                with interceptor._observed(handler_call_details, context, traced):
                    result = original(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result

            behavior = unary
        return _rebuild(handler, behavior)

    @contextlib.contextmanager
    def _observed(
        self, details: grpc.HandlerCallDetails, context: _Context, traced: bool
    ) -> Iterator[None]:
        rpc_method = details.method.lstrip("/")
        started = time.perf_counter()
        span: trace.Span | None = None
        token: Token[otel_context.Context] | None = None
        if traced:
            parent = propagate.extract(_carrier(details.invocation_metadata))
            span = self._tracer.start_span(
                rpc_method,
                context=parent,
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system.name": "grpc", "rpc.method": rpc_method},
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        code = grpc.StatusCode.OK
        try:
            yield
            code = _code_of(context) or grpc.StatusCode.OK
        except grpc.aio.AbortError:
            code = _code_of(context) or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:
            code = _cancelled_code(context)
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            attributes = {
                "rpc.system.name": "grpc",
                "rpc.method": rpc_method,
                "rpc.response.status_code": code.name,
            }
            if code in SERVER_ERROR_CODES:
                attributes["error.type"] = code.name
            self._duration.record(time.perf_counter() - started, attributes)
            if span is not None:
                span.set_attribute("rpc.response.status_code", code.name)
                if code in SERVER_ERROR_CODES:
                    span.set_attribute("error.type", code.name)
                    span.set_status(trace.StatusCode.ERROR)
                span.end()
            if token is not None:
                otel_context.detach(token)


def _carrier(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _code_of(context: _Context) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        # grpc.aio may report the code as its number.
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return None


def _cancelled_code(context: _Context) -> grpc.StatusCode:
    """CANCELLED, or DEADLINE_EXCEEDED when the caller's deadline is what ended it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
