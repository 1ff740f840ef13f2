"""A drain whose grace runs out while a job waits on its provider hands the job back and
leaves no task behind: nothing is destroyed pending when the garbage collector runs."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import grpc
import pytest
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, fetch, metadata

E = generation_pb2


async def test_a_drain_past_its_grace_leaves_no_pending_task(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # Each step of the local provider outlasts the whole grace.
    env = {"IMAGEGEN_SHUTDOWN_GRACE": "0.5", "IMAGEGEN_LOCAL_STEP_DELAY": "2"}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
            submitted = await stub.SubmitGeneration(
                E.SubmitGenerationRequest(
                    spec=common_pb2.GenerationSpec(
                        prompt="a slow lighthouse", size=common_pb2.ImageSize(width=256, height=256)
                    )
                ),
                metadata=metadata(),
            )
            watch = stub.WatchGeneration(
                E.WatchGenerationRequest(name=submitted.generation.name), metadata=metadata()
            )
            async for response in watch:
                if response.event.type == E.GENERATION_EVENT_TYPE_STARTED:
                    break
            watch.cancel()
    # The server has stopped: the job went back to the queue, unfinished.
    [row] = await fetch(database_url, "SELECT state FROM generations")
    assert row["state"] == "queued"
    # A task nobody awaits any more is reported when it is collected.
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
