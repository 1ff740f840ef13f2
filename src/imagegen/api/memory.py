"""Giving back the memory of large requests.

A request near the input limit (a source image of ~20 MB, or its base64 `data:` URL)
passes through several buffers on its way in: gRPC's slices, the serialized bytes, the
parsed message, the field's own bytes. Three things kept them resident after the RPC
ended (bench/oversize_bench.py; 20 refused sources once kept +350 to +440 MiB):

- A refused request stayed reachable: grpc's `context.abort` keeps its AbortError in the
  RPC's state, and the error's traceback holds the frames that hold the request. That is
  a cycle only a full collection frees (a large process seldom runs one), and grpc's
  accept loop holds the last RPC's state until the next RPC arrives. The interceptor cuts
  the traceback of a large request's AbortError once its RPC is over.
- glibc's mmap threshold rises to the size of every mmapped block freed (up to 32 MiB),
  so after the first large request the later ones are carved from the heap and the
  per-thread arenas, whose freed pages mostly stay resident (malloc_trim does not give
  back the top of a thread's arena). `apply_malloc_policy` fixes the threshold at
  start-up (IMAGEGEN_MALLOC_MMAP_THRESHOLD), so large blocks are mmapped and unmapped
  when freed.
- What small blocks free in the heap goes back to the OS with `malloc_trim(0)`, once, a
  moment after the last large request of a burst, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import ctypes.util
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from imagegen.api.interceptors import _behavior_of, _rebuild, _responses

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Context = grpc.aio.ServicerContext[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]

#: Requests of at least this many serialized bytes count as large.
LARGE_REQUEST_BYTES = 1024 * 1024
#: Seconds after the last large request before the heap is trimmed (one trim for a burst).
TRIM_DELAY = 0.5
#: Whether the request of the RPC this task serves is large.
_large_request: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "imagegen_large_request", default=False
)


#: mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _libc_function(name: str) -> Any:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        return getattr(ctypes.CDLL(libc_name), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


def _load_malloc_trim() -> Callable[[int], int] | None:
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def apply_malloc_policy(mmap_threshold: int) -> bool:
    """Have glibc serve every block of `mmap_threshold` bytes or more with its own mmap,
    unmapped when freed, and keep up to twice that free at the top of the heap
    (IMAGEGEN_MALLOC_MMAP_THRESHOLD; 0 keeps glibc's policy). True if applied (glibc
    only).

    glibc's own threshold rises to the size of each mmapped block freed, up to 32 MiB, so
    after the first large request every later one is carved from the heap and the
    per-thread arenas; a fixed threshold turns that growth off. The trim threshold is set
    to twice it, the ratio glibc itself keeps, because setting the one fixes the other
    at 128 KiB, and a heap given back and faulted in again on every image costs CPU."""
    if mmap_threshold <= 0:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold)
    )


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


def _forget_traceback_when_done(context: Any, aborted: BaseException) -> None:
    """Once the RPC is over, cut grpc's AbortError from its traceback, whose frames hold
    the request: the RPC's state keeps the error, so without the cut the request stays
    reachable from a cycle until a full collection, and from grpc's accept loop (which
    holds the last RPC's state) until the next RPC arrives, whatever collections run."""
    context.add_done_callback(lambda _context: setattr(aborted, "__traceback__", None))


class LargeRequestInterceptor(grpc.aio.ServerInterceptor):
    """Notes every unary request of LARGE_REQUEST_BYTES or more (by its serialized size,
    seen as grpc hands the bytes to the deserializer): the heap is trimmed after it and,
    if it ends in an abort (a refusal), nothing keeps it reachable."""

    def __init__(self, trimmer: HeapTrimmer, threshold: int = LARGE_REQUEST_BYTES) -> None:
        self._trimmer = trimmer
        self._threshold = threshold

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """Wrap the method's request deserializer so a large request schedules a trim,
        and its behavior so the abort of a large request lets go of it."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        inner = handler.request_deserializer
        trimmer, threshold = self._trimmer, self._threshold

        def deserialize(data: bytes) -> Any:
            if len(data) >= threshold:
                # grpc deserializes in the RPC's own task, just before the behavior runs.
                _large_request.set(True)
                trimmer.soon()
            return inner(data)

        original = _behavior_of(handler)
        behavior: Callable[..., Any]
        if handler.response_streaming:

            async def behavior_streaming(request: Any, context: _Context) -> AsyncIterator[Any]:
                try:
                    async for response in _responses(original(request, context)):
                        yield response
                except grpc.aio.AbortError as aborted:
                    if _large_request.get():
                        _forget_traceback_when_done(context, aborted)
                    raise

            behavior = behavior_streaming
        else:

            async def behavior_unary(request: Any, context: _Context) -> Any:
                try:
                    result = original(request, context)
                    return await result if inspect.isawaitable(result) else result
                except grpc.aio.AbortError as aborted:
                    if _large_request.get():
                        _forget_traceback_when_done(context, aborted)
                    raise

            behavior = behavior_unary
        return _rebuild(handler, behavior, deserialize)
