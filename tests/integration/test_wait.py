"""WaitGeneration through a real server in this process: a bounded unary wait that
answers when the job ends, when its timeout passes (the job then RUNNING), or shortly
before the caller's deadline, never with DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from imagegen.identity import mint_token
from tests.inprocess import TEST_JWT_KEY, serve_in_process

E = generation_pb2
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
#: The local renderer's four steps at this delay take 20 s: the job is RUNNING throughout
#: every short wait below (each test cancels it at the end).
SLOW_STEP = "5"


def metadata(user: str = "alice") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user)}"),)


def spec() -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt="a heron waiting", size=common_pb2.ImageSize(width=256, height=256)
    )


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def reason_of(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo")


@pytest.fixture
async def stub_for(tmp_path: Path, database_url: str):
    """Starts a server with the given settings and returns its stub; stops it afterwards."""
    stack = contextlib.AsyncExitStack()

    async def start(env: dict[str, str]) -> generation_pb2_grpc.ImageGenerationServiceStub:
        running = await stack.enter_async_context(
            serve_in_process(tmp_path, database_url, env=env)
        )
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}", options=CHANNEL_OPTIONS)
        )
        return generation_pb2_grpc.ImageGenerationServiceStub(channel)

    async with stack:
        yield start


async def running_job(stub: generation_pb2_grpc.ImageGenerationServiceStub) -> E.Generation:
    """A submitted job, once a worker has started it (its STARTED event seen)."""
    reply = await stub.SubmitGeneration(
        E.SubmitGenerationRequest(spec=spec()), metadata=metadata(), timeout=30
    )
    watch: AsyncIterator[E.WatchGenerationResponse] = stub.WatchGeneration(
        E.WatchGenerationRequest(name=reply.generation.name), metadata=metadata(), timeout=30
    )
    async for response in watch:
        if response.event.type == E.GENERATION_EVENT_TYPE_STARTED:
            break
    watch.cancel()  # type: ignore[attr-defined]
    return reply.generation


async def cancel(stub: generation_pb2_grpc.ImageGenerationServiceStub, name: str) -> None:
    await stub.CancelGeneration(E.CancelGenerationRequest(name=name), metadata=metadata())


async def test_returns_at_the_timeout_with_the_job_running(stub_for) -> None:
    stub = await stub_for({"IMAGEGEN_LOCAL_STEP_DELAY": SLOW_STEP})
    job = await running_job(stub)
    # The job runs for 20 s and the deadline is later still: a wait that did not end at
    # its 0.3 s timeout would answer with the job ended, not RUNNING.
    reply = await stub.WaitGeneration(
        E.WaitGenerationRequest(name=job.name, timeout=seconds(0.3)),
        metadata=metadata(),
        timeout=90,
    )
    assert reply.generation.name == job.name
    assert reply.generation.state == E.GENERATION_STATE_RUNNING
    await cancel(stub, job.name)


async def test_returns_as_soon_as_the_job_ends(stub_for) -> None:
    stub = await stub_for({})
    submitted = await stub.SubmitGeneration(
        E.SubmitGenerationRequest(spec=spec()), metadata=metadata(), timeout=30
    )
    reply = await stub.WaitGeneration(
        E.WaitGenerationRequest(name=submitted.generation.name, timeout=seconds(60)),
        metadata=metadata(),
        timeout=90,
    )
    assert reply.generation.state == E.GENERATION_STATE_COMPLETED
    assert len(reply.generation.images) == 1 and reply.generation.images[0].uri
    # A finished job is answered at once, whatever the timeout: allowed an hour, a wait
    # that did not answer at once would outlast the 30 s this test gives it.
    again = await asyncio.wait_for(
        stub.WaitGeneration(
            E.WaitGenerationRequest(name=submitted.generation.name, timeout=seconds(3600)),
            metadata=metadata(),
            timeout=3700,
        ),
        timeout=30,
    )
    assert again.generation.state == E.GENERATION_STATE_COMPLETED
    assert again.generation.last_sequence == reply.generation.last_sequence


async def test_a_cancel_ends_the_wait(stub_for) -> None:
    stub = await stub_for({"IMAGEGEN_LOCAL_STEP_DELAY": SLOW_STEP})
    job = await running_job(stub)
    wait = stub.WaitGeneration(
        E.WaitGenerationRequest(name=job.name, timeout=seconds(60)),
        metadata=metadata(),
        timeout=90,
    )
    await cancel(stub, job.name)
    reply = await wait
    assert reply.generation.state == E.GENERATION_STATE_CANCELLED


async def test_answers_before_the_callers_deadline_instead_of_failing(stub_for) -> None:
    stub = await stub_for({"IMAGEGEN_LOCAL_STEP_DELAY": SLOW_STEP})
    job = await running_job(stub)
    # Asked to wait 60 s with a 2 s deadline: the current state, in time.
    reply = await stub.WaitGeneration(
        E.WaitGenerationRequest(name=job.name, timeout=seconds(60)),
        metadata=metadata(),
        timeout=2,
    )
    assert reply.generation.state == E.GENERATION_STATE_RUNNING
    await cancel(stub, job.name)


async def test_the_default_and_the_ceiling_bound_the_wait(stub_for) -> None:
    stub = await stub_for(
        {
            "IMAGEGEN_LOCAL_STEP_DELAY": SLOW_STEP,
            "IMAGEGEN_WAIT_DEFAULT": "0.2",
            "IMAGEGEN_WAIT_MAX": "0.4",
        }
    )
    job = await running_job(stub)
    # The job runs for 20 s and each deadline is later: a wait that the default (0.2 s)
    # or the ceiling (0.4 s) did not end would answer with the job ended, not RUNNING.
    for timeout in (None, seconds(0), seconds(3600)):
        request = E.WaitGenerationRequest(name=job.name)
        if timeout is not None:
            request.timeout.CopyFrom(timeout)
        reply = await stub.WaitGeneration(request, metadata=metadata(), timeout=60)
        assert reply.generation.state == E.GENERATION_STATE_RUNNING, timeout
    await cancel(stub, job.name)


async def test_another_users_job_is_not_found(stub_for) -> None:
    stub = await stub_for({})
    submitted = await stub.SubmitGeneration(
        E.SubmitGenerationRequest(spec=spec()), metadata=metadata("alice"), timeout=30
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.WaitGeneration(
            E.WaitGenerationRequest(name=submitted.generation.name, timeout=seconds(1)),
            metadata=metadata("mallory"),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["", "generations/not-a-uuid", "images/x"])
async def test_a_bad_name_is_invalid(stub_for, name: str) -> None:
    stub = await stub_for({})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.WaitGeneration(E.WaitGenerationRequest(name=name), metadata=metadata())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "IMG_003"


async def test_a_negative_timeout_is_invalid_and_changes_nothing(stub_for) -> None:
    stub = await stub_for({})
    submitted = await stub.SubmitGeneration(
        E.SubmitGenerationRequest(spec=spec()), metadata=metadata(), timeout=30
    )
    for bad in (seconds(-1), seconds(-0.000001)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.WaitGeneration(
                E.WaitGenerationRequest(name=submitted.generation.name, timeout=bad),
                metadata=metadata(),
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(caught.value) == "IMG_003"
        status = rpc_status.from_call(caught.value)
        info = error_details_pb2.ErrorInfo()
        assert any(d.Unpack(info) for d in status.details)
        assert info.metadata["field"] == "timeout"
