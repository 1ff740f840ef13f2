"""Pieces several benchmarks share: the Forge-wire fake that answers at once with one
image, and an imagegen server started in the benchmark's own process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pybase64
from aiohttp import web

from imagegen.config import Settings
from imagegen.server import Server


async def start_forge_fake(image: bytes) -> tuple[web.AppRunner, str]:
    """A Forge ImageService fake on loopback whose every GenerateImage answers with
    `image` (a PNG) at once; returns its runner (the caller cleans it up) and its URL."""
    body = json.dumps(
        {"image": {"b64Json": pybase64.b64encode(image).decode(), "mimeType": "image/png"}}
    )

    async def generate(_request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/images.v1.ImageService/GenerateImage", generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@asynccontextmanager
async def served_channel(data_dir: Path, dsn: str, jwt_key: str) -> AsyncIterator[grpc.aio.Channel]:
    """An imagegen server in this process on `dsn` (local blobs under `data_dir`, quiet
    logs) and a channel to it; both are stopped on exit."""
    settings = Settings.from_env(
        {
            "IMAGEGEN_DATA_DIR": str(data_dir),
            "IMAGEGEN_GRPC_PORT": "0",
            "IMAGEGEN_HTTP_PORT": "0",
            "IMAGEGEN_JWT_KEY": jwt_key,
            "IMAGEGEN_LOG_LEVEL": "WARNING",
            "DATABASE_URL": dsn,
        }
    )
    server = Server(settings)
    task = asyncio.create_task(server.run(install_signal_handlers=False))
    try:
        running = await server.wait_started()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{running.grpc_port}", options=(("grpc.enable_http_proxy", 0),)
        )
        try:
            yield channel
        finally:
            await channel.close()
    finally:
        server.request_stop()
        await task
