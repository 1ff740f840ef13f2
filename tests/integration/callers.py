"""A caller of the generation and library services over a real channel, for the tests
of uploads, history and the library's contract."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
)

from imagegen.identity import mint_token
from tests.inprocess import TEST_JWT_KEY
from tests.integration.test_pipeline import CHANNEL_OPTIONS

E = generation_pb2
L = library_pb2


def md(user: str = "alice", team: str = "") -> tuple[tuple[str, str], ...]:
    """Call metadata with a token for `user` (in sub-account `team`)."""
    token = mint_token(TEST_JWT_KEY, user_id=user, sub_account=team)
    return (("authorization", f"Bearer {token}"),)


class Stubs:
    """Both services on one channel, as one caller."""

    def __init__(self, channel: grpc.aio.Channel, user: str = "alice", team: str = "") -> None:
        self.gen = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        self.lib = library_pb2_grpc.ImageLibraryServiceStub(channel)
        self.md = md(user, team)

    async def generate(self, spec: common_pb2.GenerationSpec) -> list[E.GenerationEvent]:
        return [
            r.event
            async for r in self.gen.GenerateImage(
                E.GenerateImageRequest(spec=spec), metadata=self.md, timeout=60
            )
        ]

    async def get(self, name: str) -> E.Generation:
        reply = await self.gen.GetGeneration(E.GetGenerationRequest(name=name), metadata=self.md)
        return reply.generation

    async def listed(self, **request: object) -> list[E.Generation]:
        reply = await self.gen.ListGenerations(
            E.ListGenerationsRequest(**request),  # type: ignore[arg-type]
            metadata=self.md,
        )
        return list(reply.generations)

    async def images(self, **request: object) -> list[common_pb2.Image]:
        reply = await self.lib.ListImages(
            L.ListImagesRequest(**request),  # type: ignore[arg-type]
            metadata=self.md,
        )
        return list(reply.images)

    async def wait(self, name: str) -> E.Generation:
        """The job once it ended (its watch ends at the terminal event)."""
        async for _ in self.gen.WatchGeneration(
            E.WatchGenerationRequest(name=name), metadata=self.md, timeout=60
        ):
            pass
        return await self.get(name)


@contextlib.asynccontextmanager
async def caller(port: int, user: str = "alice", team: str = "") -> AsyncIterator[Stubs]:
    """`user`'s stubs on a channel of their own to the server at `port`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
        yield Stubs(ch, user, team)


def completed(events: list[E.GenerationEvent]) -> str:
    """The job's name, once its events say it completed."""
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED, events[-1]
    return events[0].generation


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")
