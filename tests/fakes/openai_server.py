"""A local HTTP server speaking OpenAI Images' wire format (generations and edits,
JSON and multipart, streamed partial images as server-sent events, errors)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pybase64
from aiohttp import web

from tests.fakes import serve_on_loopback
from tests.fakes.forge_server import png_bytes


@dataclass
class OpenAIReply:
    status: int = 200
    error_code: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    partials: int = 2


@dataclass
class SeenCall:
    path: str
    headers: dict[str, str]
    fields: dict[str, Any]
    files: dict[str, list[tuple[str, bytes, str]]]


class OpenAIFake:
    def __init__(self) -> None:
        self.calls: list[SeenCall] = []
        self._script: list[OpenAIReply] = []
        self.default = OpenAIReply()
        self.url = ""

    def script(self, *replies: OpenAIReply) -> None:
        self._script.extend(replies)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fields: dict[str, Any] = {}
        files: dict[str, list[tuple[str, bytes, str]]] = {}
        if request.content_type == "application/json":
            fields = await request.json()
        else:
            reader = await request.multipart()
            async for part in reader:
                assert isinstance(part, type(part))
                name = part.name or ""
                data = await part.read()  # type: ignore[union-attr]
                if part.filename:  # type: ignore[union-attr]
                    files.setdefault(name, []).append(
                        (part.filename, bytes(data), part.headers.get("Content-Type", ""))  # type: ignore[union-attr]
                    )
                else:
                    fields[name] = bytes(data).decode()
        self.calls.append(SeenCall(request.path, dict(request.headers), fields, files))
        reply = self._script.pop(0) if self._script else self.default
        if reply.status != 200:
            body = {
                "error": {
                    "message": "scripted failure",
                    "type": "invalid_request_error",
                    "code": reply.error_code or None,
                }
            }
            return web.json_response(body, status=reply.status, headers=reply.headers)
        prefix = "image_edit" if request.path.endswith("/edits") else "image_generation"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(reply.partials):
            partial = png_bytes(64, 64, (40 * (index + 1), 80, 160))
            event = {
                "type": f"{prefix}.partial_image",
                "partial_image_index": index,
                "b64_json": pybase64.b64encode(partial).decode(),
            }
            await response.write(
                f"event: {prefix}.partial_image\ndata: {json.dumps(event)}\n\n".encode()
            )
        final = {
            "type": f"{prefix}.completed",
            "b64_json": pybase64.b64encode(png_bytes(1024, 1024)).decode(),
        }
        await response.write(f"event: {prefix}.completed\ndata: {json.dumps(final)}\n\n".encode())
        await response.write_eof()
        return response

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls) -> AsyncIterator[OpenAIFake]:
        fake = cls()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", fake._handle)
        app.router.add_post("/v1/images/edits", fake._handle)
        async with serve_on_loopback(app) as url:
            fake.url = url + "/v1"
            yield fake
