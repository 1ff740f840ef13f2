"""A loopback HTTP server that receives webhooks the way a customer's endpoint would: it
keeps every request it received (path, query, headers, raw body) and answers as scripted
(a status per request, a redirect, or no answer until the fake stops)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import Pauses, Seen, serve_on_loopback

#: Scripted answers: an HTTP status, "redirect" (302 to /elsewhere) or "hang".
Answer = int | str


@dataclass
class ReceivedWebhook:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """Answers the n-th callback with `answers[n]` (the last one repeats; 200 when empty)."""

    answers: list[Answer] = field(default_factory=list)
    received: Seen[ReceivedWebhook] = field(default_factory=Seen)
    base_url: str = ""
    _pauses: Pauses = field(default_factory=Pauses)

    def url(self, path: str = "/hook", query: str = "token=s3cr3t") -> str:
        return f"{self.base_url}{path}" + (f"?{query}" if query else "")

    def for_webhook(self, webhook_id: str) -> list[ReceivedWebhook]:
        return [r for r in self.received if r.webhook_id == webhook_id]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        number = len(self.received)
        await self.received.record(
            ReceivedWebhook(
                path=request.path,
                query=request.query_string,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        answer: Answer = 200
        if self.answers:
            answer = self.answers[min(number, len(self.answers) - 1)]
        if answer == "hang":
            await self._pauses.sleep(3600)
            return web.Response(status=504)
        if answer == "redirect":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        assert isinstance(answer, int)
        return web.Response(status=answer, text="ok" if answer < 300 else "scripted failure")

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, answers: list[Answer] | None = None) -> AsyncIterator[WebhookReceiver]:
        receiver = cls(answers=list(answers or []))
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver._handle)
        async with serve_on_loopback(app) as url:
            receiver.base_url = url
            try:
                yield receiver
            finally:
                receiver._pauses.stop()
