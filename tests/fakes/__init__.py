"""Local HTTP servers that speak outside providers' real wire formats."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from imagegen.api.http import start_http_server


@contextlib.asynccontextmanager
async def serve_on_loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 at a free port; yields its base URL."""
    runner, port = await start_http_server(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
