"""Local HTTP servers that speak outside providers' real wire formats.

Every fake records each request it receives in its provider's own wire form (tests
assert what was RECEIVED: size, model, seed, style or its fold, mask), and can be
scripted to answer: an image of another size than the one asked for, 400, 429 with
Retry-After, 5xx, a content-policy refusal in that provider's words (forge, openai; the
A1111 API has none: its safety checkers return a blacked-out image), a slow reply, or
a connection dropped after the request arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from typing import TypeVar

from aiohttp import web
from PIL import Image

from imagegen.api.http import start_http_server

T = TypeVar("T")


@contextlib.asynccontextmanager
async def serve_on_loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 at a free port; yields its base URL."""
    runner, port = await start_http_server(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def png_bytes(
    width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    """A flat PNG of the given size and colour."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def encoded_image(
    width: int,
    height: int,
    mime_type: str = "image/png",
    color: tuple[int, int, int] = (200, 40, 40),
) -> bytes:
    """A flat image of the given size in PNG, JPEG or WebP."""
    out = io.BytesIO()
    kind = {"image/jpeg": "JPEG", "image/webp": "WEBP"}.get(mime_type, "PNG")
    Image.new("RGB", (width, height), color).save(out, format=kind)
    return out.getvalue()


class Seen(list[T]):
    """The requests a fake received, in order (a list); a test can wait for the n-th one."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Condition()

    async def record(self, item: T) -> None:
        async with self._changed:
            self.append(item)
            self._changed.notify_all()

    async def wait_for(self, count: int) -> list[T]:
        """Return once at least `count` requests have arrived (the caller bounds the wait)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self) >= count)
            return list(self)


class Pauses:
    """The sleeps a fake takes to play a slow server, all cut short when the fake stops
    (so that stopping it never waits for a scripted delay to run out)."""

    def __init__(self) -> None:
        self._stopped = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    def stop(self) -> None:
        self._stopped.set()


async def drop_connection(request: web.Request) -> web.Response:
    """Close the connection after the request arrived, without any reply."""
    if request.transport is not None:
        request.transport.abort()
    # aiohttp has nothing left to write to; the client sees the connection drop.
    raise asyncio.CancelledError
