"""A source over the input limit, as bytes or as a base64 data: URL, is IMG_007 with an
ErrorInfo (not a transport refusal), and the refused request is not kept in memory."""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from imagegen.api.memory import HeapTrimmer, LargeRequestInterceptor
from imagegen.domain.models import SourceRef
from imagegen.identity import mint_token
from imagegen.server import receive_limit
from tests.inprocess import TEST_JWT_KEY, serve_in_process

#: Big enough that the old receive limit (the input limit + 1 MiB) refused a data: URL of a
#: source just over it at the transport, with no ErrorInfo.
LIMIT = 6 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def error_reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status: {err.code()} {err.details()}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError(f"no ErrorInfo: {err.code()} {err.details()}")


def test_the_receive_limit_leaves_room_for_a_data_url_just_over_the_input_limit() -> None:
    just_over = LIMIT + 64 * 1024
    as_data_url = len("data:image/png;base64,") + (just_over + 2) // 3 * 4
    assert receive_limit(LIMIT) > as_data_url + 1024
    assert receive_limit(20 * 1024 * 1024) == 20 * 1024 * 1024 * 4 // 3 + 1024 * 1024


async def test_an_oversize_source_is_img_007_as_bytes_and_as_a_data_url_and_is_not_kept(
    tmp_path: Path, database_url: str
) -> None:
    oversize = os.urandom(LIMIT + 64 * 1024)
    data_url = "data:image/png;base64," + base64.b64encode(oversize).decode()
    metadata = (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id='alice')}"),)
    env = {"IMAGEGEN_MAX_INPUT_BYTES": str(LIMIT)}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        address = f"127.0.0.1:{server.grpc_port}"
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
            for source in (
                common_pb2.ImageSource(data=oversize),
                common_pb2.ImageSource(uri=data_url),
            ):
                spec = common_pb2.GenerationSpec(prompt="grayscale", sources=[source])
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.SubmitGeneration(
                        generation_pb2.SubmitGenerationRequest(spec=spec), metadata=metadata
                    )
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert error_reason(refused.value) == "IMG_007"
            listed = await stub.ListGenerations(
                generation_pb2.ListGenerationsRequest(), metadata=metadata
            )
            assert list(listed.generations) == []
        # Nothing of the refused requests stays reachable: the error's traceback (whose
        # frames hold the request) is let go once its status is built.
        gc.collect()
        kept = [
            ref
            for ref in gc.get_objects()
            if isinstance(ref, SourceRef) and max(len(ref.data), len(ref.uri)) > LIMIT
        ]
        assert kept == []


class _CountingTrimmer(HeapTrimmer):
    def __init__(self) -> None:
        super().__init__(delay=0)
        self.asked = 0

    def soon(self) -> None:
        self.asked += 1


async def test_only_large_requests_ask_for_a_heap_trim() -> None:
    trimmer = _CountingTrimmer()
    interceptor = LargeRequestInterceptor(trimmer, threshold=1000)

    async def behavior(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=bytes)

    async def continuation(_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handler

    wrapped = await interceptor.intercept_service(continuation, None)  # type: ignore[arg-type]
    assert wrapped is not None and wrapped.request_deserializer is not None
    assert wrapped.request_deserializer(b"x" * 999) == b"x" * 999
    assert trimmer.asked == 0
    wrapped.request_deserializer(b"x" * 1000)
    assert trimmer.asked == 1


async def test_a_burst_of_large_requests_is_trimmed_once_after_it() -> None:
    trimmer = HeapTrimmer(delay=0.05)
    if trimmer._trim is None:  # not glibc: nothing to trim, and nothing scheduled
        trimmer.soon()
        assert trimmer._pending is None
        return
    for _ in range(5):
        trimmer.soon()
    await asyncio.wait_for(trimmer.trimmed.wait(), timeout=10)
    await trimmer.aclose()
    assert trimmer.trims == 1


class _Held:
    """A deserialized request that tells when it is freed."""

    __slots__ = ("__weakref__", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "server-streaming"])
async def test_a_large_request_refused_with_abort_is_freed_without_a_collection(
    streaming: bool,
) -> None:
    # grpc keeps the AbortError in the RPC's state and its accept loop keeps the last
    # RPC's state; the error's traceback holds the frames that hold the request.
    freed = asyncio.Event()
    received: list[weakref.ref[_Held]] = []

    def deserialize(data: bytes) -> _Held:
        held = _Held(data)
        weakref.finalize(held, freed.set)
        received.append(weakref.ref(held))
        return held

    async def refuse(request: _Held, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too large")

    async def refuse_streaming(
        request: _Held, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too large")
        yield b""  # pragma: no cover - an async generator, as servicers' streams are

    handler = (
        grpc.unary_stream_rpc_method_handler(refuse_streaming, request_deserializer=deserialize)
        if streaming
        else grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=deserialize)
    )
    trimmer = HeapTrimmer()
    server = grpc.aio.server(interceptors=[LargeRequestInterceptor(trimmer, threshold=1000)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Refuser", {"Refuse": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gc.disable()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=CHANNEL_OPTIONS
        ) as channel:
            if streaming:
                call = channel.unary_stream("/bench.Refuser/Refuse")(b"x" * 2000)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in call:
                        pass  # pragma: no cover - refused before any response
            else:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary("/bench.Refuser/Refuse")(b"x" * 2000)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            # No further RPC and no collection: only reference counting can free it.
            await asyncio.wait_for(freed.wait(), timeout=10)
        assert len(received) == 1 and received[0]() is None
    finally:
        gc.enable()
        await server.stop(None)
        await trimmer.aclose()
