"""A local HTTP server that speaks the Forge ImageService wire format.

async with ForgeFake.start() as fake:
    fake.url          # http://127.0.0.1:PORT, for BUILT_IN_FORGE_API_URL
    fake.requests     # every request seen: headers and JSON body
    fake.script(...)  # what the next requests get (else: a valid PNG, at once)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pybase64
from aiohttp import web
from PIL import Image

from tests.fakes import serve_on_loopback

PATH = "/images.v1.ImageService/GenerateImage"


def png_bytes(
    width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A small PNG whose header declares side x side pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes | None = None
    image: bytes | None = None
    mime_type: str = "image/png"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class SeenRequest:
    headers: dict[str, str]
    json: Any


class ForgeFake:
    """The fake server; see the module docstring."""

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self._script: list[Reply] = []
        self.default = Reply(image=png_bytes())
        self.url = ""

    def script(self, *replies: Reply) -> None:
        self._script.extend(replies)

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except json.JSONDecodeError:
            payload = None
        self.requests.append(SeenRequest(dict(request.headers), payload))
        reply = self._script.pop(0) if self._script else self.default
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.body is not None:
            body = reply.body
        else:
            image = reply.image if reply.image is not None else png_bytes()
            body = json.dumps(
                {
                    "image": {
                        "b64Json": pybase64.b64encode(image).decode(),
                        "mimeType": reply.mime_type,
                    }
                }
            ).encode()
        return web.Response(
            status=reply.status, body=body, content_type="application/json", headers=reply.headers
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls) -> AsyncIterator[ForgeFake]:
        fake = cls()
        app = web.Application()
        app.router.add_post(PATH, fake._handle)
        async with serve_on_loopback(app) as url:
            fake.url = url + ""
            yield fake
