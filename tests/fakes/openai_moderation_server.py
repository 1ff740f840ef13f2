"""A local HTTP server speaking the OpenAI moderation endpoint's wire format. It scores
texts by keywords it is given, can fail or stall on purpose, and keeps every request it
received (path, headers, JSON body) for the test to check."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import serve_on_loopback

#: Every category the real endpoint returns for omni-moderation-latest.
OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


@dataclass
class SeenModeration:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class ModerationFake:
    """Texts containing a key of `keywords` get that OpenAI category at its score."""

    keywords: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: answer this HTTP status instead of a result (0: answer normally)
    status: int = 0
    retry_after: str = ""
    #: hold every answer until the fake stops (plays a server that never answers)
    stalled: bool = False
    requests: list[SeenModeration] = field(default_factory=list)
    url: str = ""
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def _result(self, text: str) -> dict[str, Any]:
        scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0001)
        for keyword, (category, score) in self.keywords.items():
            if keyword in text.lower():
                scores[category] = max(scores[category], score)
        flags = {name: score >= 0.5 for name, score in scores.items()}
        return {
            "flagged": any(flags.values()),
            "categories": flags,
            "category_scores": scores,
            "category_applied_input_types": {name: ["text"] for name in scores},
        }

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(SeenModeration(request.path, dict(request.headers), body))
        if self.stalled:
            await self._released.wait()
        if self.status:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            error = {"error": {"message": "scripted failure", "type": "server_error"}}
            return web.json_response(error, status=self.status, headers=headers)
        inputs = body["input"]
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        return web.json_response(
            {
                "id": f"modr-{len(self.requests)}",
                "model": body.get("model", ""),
                "results": [self._result(text) for text in texts],
            }
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, **kwargs: Any) -> AsyncIterator[ModerationFake]:
        fake = cls(**kwargs)
        app = web.Application()
        app.router.add_post("/v1/moderations", fake._handle)
        async with serve_on_loopback(app) as url:
            fake.url = url + "/v1"
            try:
                yield fake
            finally:
                fake._released.set()
