"""grpc.aio server interceptors: drain, authentication and error mapping.

Each interceptor is independent and testable alone. They wrap the method handler
rather than acting in `intercept_service` itself, because in grpc.aio a contextvar
set there does not reliably reach the servicer; a wrapped behavior runs inside the
RPC's own task, so what it sets (the caller's identity, the request id) is seen by
the servicer and by nothing else.

The composition root installs them outermost first: drain, auth, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from imagegen.api.context import current_identity, current_request_id, request_id_from_metadata
from imagegen.api.errors import abort_with
from imagegen.domain.errors import InvalidRequest, ShuttingDown, Unauthenticated
from imagegen.domain.models import Identity
from imagegen.identity import TokenVerifier

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    # grpc's classes are generic only in the type stubs, not at run time.
    _Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]
    #: Runs before the servicer; may abort the RPC.
    _Before: TypeAlias = Callable[[_Context], Awaitable[None]]
    #: Turns an exception raised by the servicer into the RPC's end; always raises.
    _OnError: TypeAlias = Callable[[_Context, Exception], Awaitable[NoReturn]]
    #: Looks at the request before the servicer does; may raise a domain error.
    _CheckRequest: TypeAlias = Callable[[Any], None]

__all__ = [
    "AuthInterceptor",
    "DrainInterceptor",
    "ErrorInterceptor",
]


def _behavior_of(handler: _Handler) -> Callable[..., Any]:
    if handler.request_streaming:
        behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
    else:
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if behavior is None:  # pragma: no cover - grpc builds handlers with their behavior set
        raise TypeError("RPC method handler has no behavior for its streaming kind")
    return behavior


async def _responses(result: Any) -> AsyncIterator[Any]:
    """Yield what a streaming behavior produced, whatever form it took."""
    if inspect.isawaitable(result):
        # A handler that writes with `context.write()` and returns nothing.
        await result
    elif hasattr(result, "__aiter__"):
        # Closed explicitly so a client that goes away stops the servicer's generator now
        # (its `finally` blocks run), not whenever the garbage collector gets to it.
        closing = contextlib.aclosing(result) if hasattr(result, "aclose") else _no_close(result)
        async with closing:
            async for response in result:
                yield response
    else:
        for response in result:
            yield response


@contextlib.asynccontextmanager
async def _no_close(result: Any) -> AsyncIterator[Any]:
    yield result


def _wrap_handler(
    handler: _Handler,
    *,
    before: _Before | None = None,
    on_error: _OnError | None = None,
    check_request: _CheckRequest | None = None,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> _Handler:
    """A handler of the same kind whose behavior runs `before`, then `check_request`
    and the original one, sending any exception they raise (other than grpc's own
    abort) to `on_error`. `request_deserializer`, if given, replaces the handler's."""
    original = _behavior_of(handler)

    if handler.response_streaming:

        async def behavior_streaming(request: Any, context: _Context) -> AsyncIterator[Any]:
            if before is not None:
                await before(context)
            try:
                if check_request is not None:
                    check_request(request)
                async for response in _responses(original(request, context)):
                    yield response
            except grpc.aio.AbortError:
                # The servicer (or an inner interceptor) already chose the status.
                raise
            except Exception as exc:
                if on_error is None:
                    raise
                await on_error(context, exc)

        behavior: Callable[..., Any] = behavior_streaming
    else:

        async def behavior_unary(request: Any, context: _Context) -> Any:
            if before is not None:
                await before(context)
            try:
                if check_request is not None:
                    check_request(request)
                result = original(request, context)
                if inspect.isawaitable(result):
                    result = await result
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                if on_error is None:
                    raise
                await on_error(context, exc)
            return result

        behavior = behavior_unary

    # asyncio.CancelledError and GeneratorExit are BaseExceptions, so `except Exception`
    # above lets a cancelled RPC unwind untouched.
    return _rebuild(handler, behavior, request_deserializer)


def _rebuild(
    handler: _Handler,
    behavior: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> _Handler:
    """A handler of the same kind and serializers as `handler` (the request
    deserializer replaced if one is given), running `behavior`."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name.lower() == key:
            return value if isinstance(value, str) else None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies `authorization: Bearer <jwt>` before the servicer runs.

    Sets `current_request_id` and `current_identity` for the RPC; a missing or bad
    token ends the RPC with UNAUTHENTICATED (rich status) and the servicer never runs.
    Methods under `public_prefixes` (health, reflection) need no token.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        public_prefixes: Sequence[str] = ("/grpc.health.v1.", "/grpc.reflection."),
    ) -> None:
        self._verifier = verifier
        self._public_prefixes = tuple(public_prefixes)

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """Wrap the method's handler so it authenticates first (public methods as they are)."""
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._public_prefixes):
            return handler

        async def authenticate(context: _Context) -> None:
            current_request_id.set(
                request_id_from_metadata(handler_call_details.invocation_metadata)
            )
            try:
                caller = self._identify(handler_call_details)
            except Unauthenticated as exc:
                log.info(
                    "unauthenticated call to %s: %s (request id %s)",
                    handler_call_details.method,
                    exc.message,
                    current_request_id.get(),
                )
                await abort_with(context, exc)
            # Not reset afterwards: the RPC's task (and so its context) ends with the RPC.
            current_identity.set(caller)

        return _wrap_handler(handler, before=authenticate)

    def _identify(self, details: grpc.HandlerCallDetails) -> Identity:
        header = _metadata_value(details, "authorization")
        if header is None:
            raise Unauthenticated(
                "missing bearer token: send metadata `authorization: Bearer <jwt>` "
                "(get one with `imagegen token --user USER`)"
            )
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "the `authorization` metadata must be `Bearer <jwt>` "
                "(get a token with `imagegen token --user USER`)"
            )
        return self._verifier.verify(token.strip())


class _Undecodable:
    """Handed on instead of a request whose bytes did not decode, so the refusal is
    made inside the RPC (after authentication) with a rich status."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # grpc calls the deserializer before any interceptor's behavior runs, and turns
    # its exception into a bare UNKNOWN; catching it here keeps the decision ours.
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return deserialize


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidRequest(
            "the request does not decode as this method's request message "
            f"({request.problem}); send the message its proto declares"
        )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Ends an RPC whose servicer raised with that error's rich status (see api/errors.py),
    and one whose request bytes do not decode with INVALID_ARGUMENT (IMG_003).

    Covers unary and streaming responses, including errors raised after some messages
    were sent. grpc's own AbortError and cancellation pass through untouched. Requests
    of client-streaming methods (the contract has none) are decoded by grpc as before.
    """

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """Wrap the method's handler so its exceptions become rich statuses."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming or handler.request_deserializer is None:
            return _wrap_handler(handler, on_error=abort_with)
        return _wrap_handler(
            handler,
            on_error=abort_with,
            check_request=_refuse_undecodable,
            request_deserializer=_tolerant(handler.request_deserializer),
        )


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """While `is_draining()` is true, refuses new RPCs with UNAVAILABLE before they start.

    RPCs already running are not touched; they get the shutdown grace to finish.
    Methods under `exempt_prefixes` (health, so balancers see NOT_SERVING) still pass.
    """

    def __init__(
        self,
        is_draining: Callable[[], bool],
        exempt_prefixes: Sequence[str] = ("/grpc.health.v1.",),
    ) -> None:
        self._is_draining = is_draining
        self._exempt_prefixes = tuple(exempt_prefixes)

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """Pass the handler through, or, while draining, one that refuses the call."""
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not self._is_draining()
            or handler_call_details.method.startswith(self._exempt_prefixes)
        ):
            return handler

        async def refuse(context: _Context) -> None:
            await abort_with(
                context,
                ShuttingDown("this replica is shutting down; retry, another replica will take it"),
            )

        return _wrap_handler(handler, before=refuse)


class InflightInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs in progress (health and reflection aside), so a draining server
    knows when every caller's call has ended and it can stop before the grace runs out."""

    def __init__(
        self, exempt_prefixes: Sequence[str] = ("/grpc.health.v1.", "/grpc.reflection.")
    ) -> None:
        self._exempt_prefixes = tuple(exempt_prefixes)
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    async def wait_idle(self, within: float) -> bool:
        """Wait until no counted RPC runs; False if `within` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(within, 0))
        except TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self._count += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """Wrap the handler so its run is counted from start to end."""
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt_prefixes):
            return handler
        original = _behavior_of(handler)
        tracker = self

        if handler.response_streaming:

            async def counted_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
                tracker._enter()
                try:
                    async for response in _responses(original(request, context)):
                        yield response
                finally:
                    tracker._leave()

            behavior: Callable[..., Any] = counted_stream
        else:

            async def counted_unary(request: Any, context: _Context) -> Any:
                tracker._enter()
                try:
                    result = original(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                finally:
                    tracker._leave()

            behavior = counted_unary
        return _rebuild(handler, behavior)
