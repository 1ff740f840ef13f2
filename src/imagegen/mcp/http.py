"""MCP over Streamable HTTP at `/mcp`, stateless, on its own port.

The SDK's Streamable HTTP app is ASGI (Starlette) and the service's HTTP side is
aiohttp, which cannot mount it; so it gets its own uvicorn server, started and
stopped by the composition root. It is stateless (`stateless_http=True`): no request
depends on an earlier one having reached the same replica, so any replica answers.

In front of the SDK app sits `_Gate`:
- every request must carry `Authorization: Bearer <JWT>` that `authenticate` accepts
  (the same verifier as gRPC), else 401; the token then travels with each gRPC call.
- an `initialize` request without a session gets an `Mcp-Session-Id` in its answer.
  The server keeps nothing for it (still stateless: any replica accepts any id); it
  only gives a client's later requests an identity, so a re-sent request can be told
  from a new one (see `imagegen.mcp.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegen.mcp.backend import Backend
from imagegen.mcp.server import build_mcp_server
from imagegen.mcp.tools import McpOptions

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
_SESSION_HEADER = b"mcp-session-id"
_VERSION_HEADER = b"mcp-protocol-version"
#: The initialize request is small; a body past this is not one (and is not buffered).
_MAX_PEEK_BYTES = 256 * 1024
_START_TIMEOUT = 30.0


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _refuse(send: Send, status: int, error: str, description: str) -> None:
    body = json.dumps({"error": error, "error_description": description}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (
                    b"www-authenticate",
                    f'Bearer error="{error}", error_description="{description}"'.encode(),
                ),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Gate:
    """Authenticates every HTTP request and issues session ids at initialize."""

    def __init__(self, app: ASGIApp, authenticate: Callable[[str], bool]) -> None:
        self._app = app
        self._authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            await _refuse(send, 401, "invalid_request", "send Authorization: Bearer <JWT>")
            return
        if not self._authenticate(token):
            await _refuse(send, 401, "invalid_token", "the bearer token is invalid or expired")
            return
        if (
            scope.get("method") == "POST"
            and _header(scope, _SESSION_HEADER) is None
            and _header(scope, _VERSION_HEADER) is None
        ):
            receive, is_initialize = await _peek_initialize(receive)
            if is_initialize:
                send = _with_session_id(send, secrets.token_urlsafe(24))
        await self._app(scope, receive, send)


async def _peek_initialize(receive: Receive) -> tuple[Receive, bool]:
    """Read the request body (up to a bound), say whether it is `initialize`, and return a
    `receive` that replays what was read."""
    messages: list[Message] = []
    size = 0
    more = True
    while more and size <= _MAX_PEEK_BYTES:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        more = bool(message.get("more_body", False))
    is_initialize = False
    if not more:
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            payload = json.loads(body)
            is_initialize = isinstance(payload, dict) and payload.get("method") == "initialize"
    replay = iter(messages)

    async def replaying() -> Any:
        for message in replay:
            return message
        return await receive()

    return replaying, is_initialize


def _with_session_id(send: Send, session_id: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and message.get("status") == 200:
            headers = [
                (k, v) for k, v in message.get("headers", []) if bytes(k).lower() != _SESSION_HEADER
            ]
            headers.append((_SESSION_HEADER, session_id.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return sending


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the composition root owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class McpHttpServer:
    """The `/mcp` endpoint on its own port: `start()` binds and serves, `stop()` drains."""

    def __init__(
        self,
        backend: Backend,
        options: McpOptions,
        *,
        host: str,
        port: int,
        authenticate: Callable[[str], bool],
        max_body_bytes: int,
        version: str = "",
    ) -> None:
        mcp_server = build_mcp_server(backend, options, version=version)
        starlette_app = mcp_server.streamable_http_app(
            streamable_http_path=MCP_PATH,
            stateless_http=True,
            host=host,
            max_request_body_size=max_body_bytes,
        )
        self.app: ASGIApp = _Gate(starlette_app, authenticate)
        self._host = host
        self._port = port
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind (port 0 picks a free one), serve, and return the bound port."""
        sock = _bind(self._host, self._port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="on", log_level="warning"
        )
        server = _EmbeddedUvicorn(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="mcp-http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        # uvicorn offers no started event; its flag flips once the listener is up.
        while not server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("the MCP HTTP server stopped while starting")
            if loop.time() > deadline:
                raise RuntimeError("the MCP HTTP server did not start in time")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting connections; give open requests `grace` seconds, then cut them."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(int(grace), 1)
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace + 2)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = None
