"""A server in this process with every provider there is: the local renderer without
pauses, and forge, openai and sdwebui each pointed at its wire-format fake
(tests/fakes/), for tests that run the same request through every provider."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.fakes.forge_server import ForgeFake
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.sdwebui_server import SDFake
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS

PROVIDERS = ("local", "forge", "openai", "sdwebui")


@dataclass
class Served:
    """The fakes (each records what it received) and a channel to the server."""

    forge: ForgeFake
    openai: OpenAIFake
    sdwebui: SDFake
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def serve_with_fakes(tmp_path: Path, database_url: str) -> AsyncIterator[Served]:
    """Start the fakes and the server; stop them on exit."""
    async with (
        ForgeFake.start() as forge,
        OpenAIFake.start() as openai,
        SDFake.start(step_delay=0) as sdwebui,
    ):
        env = {
            "BUILT_IN_FORGE_API_URL": forge.url,
            "BUILT_IN_FORGE_API_KEY": "k",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": openai.url,
            "IMAGEGEN_SDWEBUI_URL": sdwebui.url,
            "IMAGEGEN_LOCAL_STEP_DELAY": "0",
        }
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                yield Served(forge, openai, sdwebui, channel)
