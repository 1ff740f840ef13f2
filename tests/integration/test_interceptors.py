"""The server interceptors against a real grpc.aio server on loopback.

A tiny servicer stands in for the real ones: GetGeneration (unary) and
WatchGeneration (server streaming) do whatever each test tells them to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from imagegen.v1 import generation_pb2, generation_pb2_grpc

from imagegen.api.context import current_identity, current_request_id, identity
from imagegen.api.interceptors import AuthInterceptor, DrainInterceptor, ErrorInterceptor
from imagegen.domain import errors as domain
from imagegen.domain.models import Identity
from imagegen.identity import TokenVerifier, mint_token

KEY = "integration-test-key-0123456789abcdef"

Unary = Callable[
    [generation_pb2.GetGenerationRequest, Any], Awaitable[generation_pb2.GetGenerationResponse]
]
Streaming = Callable[
    [generation_pb2.WatchGenerationRequest, Any],
    AsyncIterator[generation_pb2.WatchGenerationResponse],
]


class ScriptedServicer(generation_pb2_grpc.ImageGenerationServiceServicer):
    """Runs the test's script and records what the servicer saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.identities: list[Identity] = []
        self.request_ids: list[str] = []
        self.unary: Unary = self._echo
        self.streaming: Streaming = self._count

    def _record(self) -> None:
        self.calls += 1
        caller = current_identity.get(None)
        if caller is not None:
            self.identities.append(caller)
        self.request_ids.append(current_request_id.get())

    async def _echo(
        self, request: generation_pb2.GetGenerationRequest, context: Any
    ) -> generation_pb2.GetGenerationResponse:
        return generation_pb2.GetGenerationResponse(
            generation=generation_pb2.Generation(name=request.name)
        )

    async def _count(
        self, request: generation_pb2.WatchGenerationRequest, context: Any
    ) -> AsyncIterator[generation_pb2.WatchGenerationResponse]:
        for sequence in (1, 2, 3):
            yield event(sequence)

    async def GetGeneration(
        self, request: generation_pb2.GetGenerationRequest, context: Any
    ) -> generation_pb2.GetGenerationResponse:
        self._record()
        return await self.unary(request, context)

    async def WatchGeneration(
        self, request: generation_pb2.WatchGenerationRequest, context: Any
    ) -> AsyncIterator[generation_pb2.WatchGenerationResponse]:
        self._record()
        async for response in self.streaming(request, context):
            yield response


def event(sequence: int) -> generation_pb2.WatchGenerationResponse:
    return generation_pb2.WatchGenerationResponse(
        event=generation_pb2.GenerationEvent(generation="generations/g1", sequence=sequence)
    )


@dataclass
class Served:
    servicer: ScriptedServicer
    # The generated stubs are typed for the sync API; these are grpc.aio stubs.
    stub: Any
    health: Any
    draining: list[bool]
    channel: grpc.aio.Channel


def default_interceptors(draining: list[bool]) -> list[grpc.aio.ServerInterceptor]:
    # The composition root's order: drain, auth, errors.
    return [
        DrainInterceptor(lambda: draining[0]),
        AuthInterceptor(TokenVerifier(KEY, ["HS256"], None, None)),
        ErrorInterceptor(),
    ]


@contextlib.asynccontextmanager
async def serve(
    make_interceptors: Callable[
        [list[bool]], Sequence[grpc.aio.ServerInterceptor]
    ] = default_interceptors,
) -> AsyncIterator[Served]:
    draining = [False]
    # The typed stubs make every RPC abstract; at run time the base answers UNIMPLEMENTED.
    servicer = ScriptedServicer()  # type: ignore[abstract]
    server = grpc.aio.server(interceptors=list(make_interceptors(draining)))
    generation_pb2_grpc.add_ImageGenerationServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
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
            draining,
            channel,
        )
    finally:
        await channel.close()
        await server.stop(None)


def bearer(token: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), *extra)


def good_token(user_id: str = "alice", plan: str = "pro") -> str:
    return mint_token(KEY, user_id=user_id, plan=plan, sub_account="team")


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status: status_pb2.Status | None = rpc_status.from_call(err)
    assert status is not None, "the error carries no rich status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def alg_none_token() -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(
        json.dumps({"sub": "mallory", "plan": "enterprise", "exp": 4_000_000_000}).encode()
    )
    return f"{header}.{payload}."


BAD_CREDENTIALS = {
    "missing": (),
    "not-bearer": (("authorization", f"Basic {good_token()}"),),
    "empty-bearer": (("authorization", "Bearer "),),
    "expired": bearer(
        mint_token(
            KEY,
            user_id="alice",
            lifetime=timedelta(minutes=1),
            now=datetime.now(UTC) - timedelta(hours=2),
        )
    ),
    "bad-signature": bearer(mint_token("another-key-that-is-long-enough-000000", user_id="alice")),
    "alg-none": bearer(alg_none_token()),
    "garbage": bearer("not.a.jwt"),
}


@pytest.mark.parametrize("metadata", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
async def test_bad_credentials_are_refused_before_the_servicer_runs(
    metadata: tuple[tuple[str, str], ...],
) -> None:
    async with serve() as served:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name="generations/g1"), metadata=metadata
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == "UNAUTHENTICATED"
        assert error_info(caught.value).domain == "imagegen.v1"
        details = caught.value.details() or ""
        assert "imagegen token" in details or "Bearer" in details
        # The streaming RPC is guarded the same way.
        with pytest.raises(grpc.aio.AioRpcError) as caught_stream:
            async for _ in served.stub.WatchGeneration(
                generation_pb2.WatchGenerationRequest(name="generations/g1"), metadata=metadata
            ):
                pass
        assert caught_stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert served.servicer.calls == 0


async def test_expired_token_says_what_to_do_without_echoing_it() -> None:
    token = mint_token(
        KEY,
        user_id="alice",
        lifetime=timedelta(minutes=1),
        now=datetime.now(UTC) - timedelta(hours=2),
    )
    async with serve() as served:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name="generations/g1"), metadata=bearer(token)
            )
    details = caught.value.details() or ""
    assert "expired" in details
    assert token not in details


async def test_identity_and_request_id_reach_the_servicer() -> None:
    async with serve() as served:
        reply = await served.stub.GetGeneration(
            generation_pb2.GetGenerationRequest(name="generations/g1"),
            metadata=bearer(good_token(), ("x-request-id", "req-123")),
        )
        assert reply.generation.name == "generations/g1"
        events = [
            response.event.sequence
            async for response in served.stub.WatchGeneration(
                generation_pb2.WatchGenerationRequest(name="generations/g1"),
                metadata=bearer(good_token("bob", "basic")),
            )
        ]
        assert events == [1, 2, 3]
        assert served.servicer.identities == [
            Identity("alice", "team", "pro"),
            Identity("bob", "team", "basic"),
        ]
        assert served.servicer.request_ids[0] == "req-123"
        # No usable x-request-id: a fresh one is made.
        assert len(served.servicer.request_ids[1]) == 32


async def test_insane_request_id_is_replaced() -> None:
    async with serve() as served:
        await served.stub.GetGeneration(
            generation_pb2.GetGenerationRequest(name="generations/g1"),
            metadata=bearer(good_token(), ("x-request-id", "x" * 500)),
        )
    assert served.servicer.request_ids[0] != "x" * 500
    assert len(served.servicer.request_ids[0]) == 32


async def test_identities_do_not_leak_between_concurrent_calls() -> None:
    async with serve() as served:
        users = [f"user-{n}" for n in range(5)]
        # Opens once every call is inside the servicer, so all of them overlap.
        gate = asyncio.Event()

        async def slow_echo(
            request: generation_pb2.GetGenerationRequest, context: Any
        ) -> generation_pb2.GetGenerationResponse:
            if served.servicer.calls == len(users):
                gate.set()
            await gate.wait()
            # Read again after the other calls have set their own identities.
            return generation_pb2.GetGenerationResponse(
                generation=generation_pb2.Generation(name=identity().user_id)
            )

        served.servicer.unary = slow_echo
        calls = [
            asyncio.ensure_future(
                served.stub.GetGeneration(
                    generation_pb2.GetGenerationRequest(name="x"), metadata=bearer(good_token(user))
                )
            )
            for user in users
        ]
        replies = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
    assert [reply.generation.name for reply in replies] == users


async def test_not_found_becomes_rich_not_found() -> None:
    async with serve() as served:

        async def missing(request: Any, context: Any) -> generation_pb2.GetGenerationResponse:
            raise domain.NotFound(f"{request.name} does not exist", metadata={"name": request.name})

        served.servicer.unary = missing
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name="generations/nope"),
                metadata=bearer(good_token()),
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "generations/nope does not exist"
    info = error_info(caught.value)
    assert info.reason == "NOT_FOUND"
    assert info.domain == "imagegen.v1"
    assert dict(info.metadata) == {"name": "generations/nope"}


@pytest.mark.parametrize(
    ("retryable", "code"),
    [(True, grpc.StatusCode.UNAVAILABLE), (False, grpc.StatusCode.INTERNAL)],
)
async def test_stream_error_after_messages_becomes_rich_status(
    retryable: bool, code: grpc.StatusCode
) -> None:
    async with serve() as served:

        async def two_then_fail(
            request: Any, context: Any
        ) -> AsyncIterator[generation_pb2.WatchGenerationResponse]:
            yield event(1)
            yield event(2)
            raise domain.ProviderFailed("the provider timed out", retryable=retryable)

        served.servicer.streaming = two_then_fail
        received: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in served.stub.WatchGeneration(
                generation_pb2.WatchGenerationRequest(name="generations/g1"),
                metadata=bearer(good_token()),
            ):
                received.append(response.event.sequence)
    assert received == [1, 2]
    assert caught.value.code() == code
    assert caught.value.details() == "the provider timed out"
    assert error_info(caught.value).reason == "IMG_002"


async def test_rate_limit_carries_retry_info_over_the_wire() -> None:
    async with serve() as served:

        async def limited(request: Any, context: Any) -> generation_pb2.GetGenerationResponse:
            raise domain.RateLimited("10 requests per hour", retry_after=timedelta(seconds=42))

        served.servicer.unary = limited
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name="g"), metadata=bearer(good_token())
            )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details if detail.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.seconds == 42


async def test_unexpected_exception_is_generic_internal() -> None:
    async with serve() as served:

        async def buggy(request: Any, context: Any) -> generation_pb2.GetGenerationResponse:
            raise RuntimeError("database password is hunter2")

        served.servicer.unary = buggy
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name="g"),
                metadata=bearer(good_token(), ("x-request-id", "trace-me")),
            )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert "hunter2" not in details
    assert "trace-me" in details
    # A bug has no stable reason: no ErrorInfo, but the request id to quote.
    status = rpc_status.from_call(caught.value)
    assert not any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details)
    info = error_details_pb2.RequestInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    assert info.request_id == "trace-me"


async def test_unimplemented_method_stays_unimplemented() -> None:
    async with serve() as served:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.ListGenerations(
                generation_pb2.ListGenerationsRequest(), metadata=bearer(good_token())
            )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # As gRPC answers an unknown method: no ErrorInfo (UNIMPLEMENTED is not a reason).
    status = rpc_status.from_call(caught.value)
    assert status is None or not any(
        d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details
    )


async def test_servicer_abort_passes_through_untouched() -> None:
    async with serve() as served:

        async def aborts(request: Any, context: Any) -> generation_pb2.GetGenerationResponse:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "chosen by the servicer")
            raise AssertionError("unreachable")

        served.servicer.unary = aborts
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name="g"), metadata=bearer(good_token())
            )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.details() == "chosen by the servicer"


async def test_client_cancel_stops_the_servicer_stream() -> None:
    stopped = asyncio.Event()
    async with serve() as served:

        async def endless(
            request: Any, context: Any
        ) -> AsyncIterator[generation_pb2.WatchGenerationResponse]:
            try:
                sequence = 0
                while True:
                    sequence += 1
                    yield event(sequence)
                    await asyncio.sleep(0.01)
            finally:
                stopped.set()

        served.servicer.streaming = endless
        call = served.stub.WatchGeneration(
            generation_pb2.WatchGenerationRequest(name="generations/g1"),
            metadata=bearer(good_token()),
        )
        first = await call.read()
        assert isinstance(first, generation_pb2.WatchGenerationResponse)
        call.cancel()
        await asyncio.wait_for(stopped.wait(), timeout=5)


async def test_error_interceptor_works_alone() -> None:
    async with serve(lambda _draining: [ErrorInterceptor()]) as served:

        async def invalid(request: Any, context: Any) -> generation_pb2.GetGenerationResponse:
            raise domain.InvalidRequest("name must look like generations/{id}", field="name")

        served.servicer.unary = invalid
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(generation_pb2.GetGenerationRequest(name="g"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "IMG_003"
    status = rpc_status.from_call(caught.value)
    bad_request = error_details_pb2.BadRequest()
    assert any(
        detail.Unpack(bad_request) for detail in status.details if detail.Is(bad_request.DESCRIPTOR)
    )
    assert [v.field for v in bad_request.field_violations] == ["name"]


async def test_identity_without_auth_interceptor_is_unauthenticated() -> None:
    # A servicer mounted without the auth interceptor must not run anonymously.
    async with serve(lambda _draining: [ErrorInterceptor()]) as served:

        async def needs_caller(request: Any, context: Any) -> generation_pb2.GetGenerationResponse:
            identity()
            raise AssertionError("not reached")

        served.servicer.unary = needs_caller
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(generation_pb2.GetGenerationRequest(name="g"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "UNAUTHENTICATED"


async def test_drain_refuses_new_rpcs_but_not_health() -> None:
    async with serve() as served:
        served.draining[0] = True
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name="g"), metadata=bearer(good_token())
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (caught.value.details() or "")
        assert error_info(caught.value).reason == "SHUTTING_DOWN"
        with pytest.raises(grpc.aio.AioRpcError) as caught_stream:
            async for _ in served.stub.WatchGeneration(
                generation_pb2.WatchGenerationRequest(name="g"), metadata=bearer(good_token())
            ):
                pass
        assert caught_stream.value.code() == grpc.StatusCode.UNAVAILABLE
        assert served.servicer.calls == 0
        # Health needs no token and still answers while draining, so balancers can see it.
        reply = await served.health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Back to normal once the flag drops.
        served.draining[0] = False
        await served.stub.GetGeneration(
            generation_pb2.GetGenerationRequest(name="g"), metadata=bearer(good_token())
        )
        assert served.servicer.calls == 1


async def test_drain_does_not_cut_running_streams() -> None:
    async with serve() as served:
        release = asyncio.Event()

        async def waits(
            request: Any, context: Any
        ) -> AsyncIterator[generation_pb2.WatchGenerationResponse]:
            yield event(1)
            await release.wait()
            yield event(2)

        served.servicer.streaming = waits
        call = served.stub.WatchGeneration(
            generation_pb2.WatchGenerationRequest(name="g"), metadata=bearer(good_token())
        )
        assert (await call.read()).event.sequence == 1
        served.draining[0] = True
        release.set()
        assert (await call.read()).event.sequence == 2
        assert await call.code() == grpc.StatusCode.OK


#: Bytes that are not a GetGenerationRequest / WatchGenerationRequest: a truncated
#: varint, a string field with invalid UTF-8, a field with a wire type that cannot be.
UNDECODABLE = {
    "truncated": b"\x0a\x05ab",
    "bad-utf8": b"\x0a\x02\xff\xfe",
    "endless-varint": b"\x10" + b"\xff" * 11,
    "wrong-wire-type": b"\x0f",
}


@pytest.mark.parametrize("data", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_undecodable_request_is_invalid_argument(data: bytes) -> None:
    async with serve() as served:
        unary = served.channel.unary_unary("/imagegen.v1.ImageGenerationService/GetGeneration")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(data, metadata=bearer(good_token()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "IMG_003"
        assert "does not decode" in (caught.value.details() or "")

        streaming = served.channel.unary_stream(
            "/imagegen.v1.ImageGenerationService/WatchGeneration"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in streaming(data, metadata=bearer(good_token())):
                raise AssertionError("no response for a request that does not decode")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "IMG_003"
        assert served.servicer.calls == 0


async def test_undecodable_request_without_credentials_is_unauthenticated() -> None:
    async with serve() as served:
        unary = served.channel.unary_unary("/imagegen.v1.ImageGenerationService/GetGeneration")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(UNDECODABLE["bad-utf8"])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert served.servicer.calls == 0


async def test_decodable_raw_request_reaches_the_servicer() -> None:
    async with serve() as served:
        unary = served.channel.unary_unary("/imagegen.v1.ImageGenerationService/GetGeneration")
        request = generation_pb2.GetGenerationRequest(name="generations/g1")
        reply = await unary(request.SerializeToString(), metadata=bearer(good_token()))
        assert generation_pb2.GetGenerationResponse.FromString(reply).generation.name == (
            "generations/g1"
        )
