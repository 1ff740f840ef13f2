"""Giving back the memory of large requests.

A request near the input limit (a source image of ~20 MB, or its base64 `data:` URL)
passes through several buffers on its way in: gRPC's slices, the serialized bytes, the
parsed message, the field's own bytes. All are freed when the RPC ends, but glibc keeps
the freed heap pages of its many per-thread arenas for reuse, so each such request left
tens of MB of resident memory behind (bench/oversize_bench.py measured 60-80 MB per refused
source). After a large request the process asks glibc to hand free pages back to the OS
(`malloc_trim(0)`), once, a moment after the last large request, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]

#: Requests of at least this many serialized bytes count as large.
LARGE_REQUEST_BYTES = 1024 * 1024
#: Seconds after the last large request before the heap is trimmed (one trim for a burst).
TRIM_DELAY = 0.5


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Schedules one `malloc_trim(0)` in a worker thread a moment after large requests."""

    def __init__(self, delay: float = TRIM_DELAY) -> None:
        self._trim = _load_malloc_trim()
        self._delay = delay
        self._pending: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[None] | None = None
        #: trims done so far, and an event set after each (for tests and benchmarks)
        self.trims = 0
        self.trimmed = asyncio.Event()

    def soon(self) -> None:
        """Trim `delay` seconds from now (a later call moves the trim later)."""
        if self._trim is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._pending is not None:
            self._pending.cancel()
        self._pending = loop.call_later(self._delay, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        if self._running is not None and not self._running.done():
            return
        self._running = loop.run_in_executor(None, self._run)
        self._running.add_done_callback(lambda _done: self.trimmed.set())

    def _run(self) -> None:
        assert self._trim is not None
        self._trim(0)
        self.trims += 1

    async def aclose(self) -> None:
        """Drop a pending trim and wait for one in progress (shutdown)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._running is not None:
            with contextlib.suppress(Exception):
                await self._running


class LargeRequestInterceptor(grpc.aio.ServerInterceptor):
    """Notes every unary request of LARGE_REQUEST_BYTES or more (by its serialized size,
    seen as grpc hands the bytes to the deserializer) and has the heap trimmed after it."""

    def __init__(self, trimmer: HeapTrimmer, threshold: int = LARGE_REQUEST_BYTES) -> None:
        self._trimmer = trimmer
        self._threshold = threshold

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """Wrap the method's request deserializer so a large request schedules a trim."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        inner = handler.request_deserializer
        trimmer, threshold = self._trimmer, self._threshold

        def deserialize(data: bytes) -> Any:
            if len(data) >= threshold:
                trimmer.soon()
            return inner(data)

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        return factory(
            behavior,  # type: ignore[arg-type]
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )
