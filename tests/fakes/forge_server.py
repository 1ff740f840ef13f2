"""A local HTTP server that speaks the Forge ImageService wire format (Connect's JSON
unary protocol).

async with ForgeFake.start() as fake:
    fake.url          # http://127.0.0.1:PORT, for BUILT_IN_FORGE_API_URL
    fake.requests     # every request received: headers and JSON body (prompt,
                      # original_images); `await fake.requests.wait_for(n)`
    fake.script(...)  # what the next requests get (else `fake.default`: a valid PNG)

The ImageService body has no size, model, seed or style: what a test can check is the
prompt (with the style and negative prompt folded in) and the original images.
Failures are Connect errors: {"code": "...", "message": "...", "details": [...]}.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pybase64
from aiohttp import web
from google.rpc import error_details_pb2

from tests.fakes import Pauses, Seen, drop_connection, encoded_image, png_bytes, serve_on_loopback

__all__ = ["ForgeFake", "Reply", "SeenRequest", "bomb_png", "png_bytes"]

PATH = "/images.v1.ImageService/GenerateImage"
#: Connect's code for each HTTP status the fake is asked to fail with.
CONNECT_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    408: "deadline_exceeded",
    429: "resource_exhausted",
    500: "internal",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
}


def bomb_png(side: int = 30000) -> bytes:
    """A small PNG whose header declares side x side pixels (a decompression bomb)."""

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
    """One scripted answer. With neither `body` nor `image`, a PNG of `size` (64x64 when
    unset) is sent; a `status` of 400 or more sends a Connect error instead."""

    status: int = 200
    body: bytes | None = None
    image: bytes | None = None
    mime_type: str = "image/png"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: width, height of the image answered (whatever the request implied)
    size: tuple[int, int] | None = None
    #: Connect error code and message (defaults follow the status)
    code: str = ""
    message: str = "scripted failure"
    #: ErrorInfo reason carried in the Connect error's details
    reason: str = ""
    #: close the connection after the request arrived, with no reply at all
    drop: bool = False

    @classmethod
    def error(cls, status: int, message: str = "scripted failure", **kwargs: Any) -> Reply:
        return cls(status=status, message=message, **kwargs)

    @classmethod
    def policy_refusal(cls) -> Reply:
        """How the ImageService refuses content: invalid_argument with an ErrorInfo."""
        return cls(
            status=400,
            code="invalid_argument",
            message="the request was refused by the content policy",
            reason="CONTENT_POLICY_VIOLATION",
        )

    @classmethod
    def slow(cls, seconds: float) -> Reply:
        return cls(delay=seconds)

    def connect_error(self) -> bytes:
        error: dict[str, Any] = {
            "code": self.code or CONNECT_CODES.get(self.status, "unknown"),
            "message": self.message,
        }
        if self.reason:
            info = error_details_pb2.ErrorInfo(reason=self.reason, domain="forge")
            error["details"] = [
                {
                    "type": "google.rpc.ErrorInfo",
                    "value": pybase64.b64encode(info.SerializeToString()).decode().rstrip("="),
                }
            ]
        return json.dumps(error).encode()


@dataclass
class SeenRequest:
    """One request as the ImageService received it."""

    headers: dict[str, str]
    json: Any

    @property
    def prompt(self) -> str:
        return str(self.json["prompt"])

    @property
    def original_images(self) -> list[bytes]:
        return [pybase64.b64decode(i["b64Json"]) for i in self.json.get("original_images", [])]


class ForgeFake:
    """The fake server; see the module docstring."""

    def __init__(self) -> None:
        self.requests: Seen[SeenRequest] = Seen()
        self._script: list[Reply] = []
        self.default = Reply(image=png_bytes())
        self.url = ""
        self.pauses = Pauses()

    def script(self, *replies: Reply) -> None:
        self._script.extend(replies)

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except json.JSONDecodeError:
            payload = None
        await self.requests.record(SeenRequest(dict(request.headers), payload))
        reply = self._script.pop(0) if self._script else self.default
        if reply.delay:
            await self.pauses.sleep(reply.delay)
        if reply.drop:
            return await drop_connection(request)
        if reply.body is not None:
            body = reply.body
        elif reply.status >= 400:
            body = reply.connect_error()
        else:
            if reply.image is not None:
                image = reply.image
            elif reply.size is not None:
                image = encoded_image(*reply.size, mime_type=reply.mime_type)
            else:
                image = png_bytes()
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
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(PATH, fake._handle)
        async with serve_on_loopback(app) as url:
            fake.url = url
            try:
                yield fake
            finally:
                fake.pauses.stop()
