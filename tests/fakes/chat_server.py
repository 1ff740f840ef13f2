"""A local HTTP server speaking OpenAI's chat-completions wire format, as the prompt
enhancement model (providers/chat_enhancer.py) uses it.

Like the real API it refuses, with 400 invalid_request_error, a body without a model or
without messages, a message without a role or content, and an unknown model; with 401 a
missing or wrong bearer key when it was started with one. Beyond the real API, it also
refuses (400) a user message that does not name the style (`Style: ...`) and the prompt
(`Prompt: ...`): what the enhancer must send. Each request it takes is recorded with
the style and prompt it received.

async with ChatFake.start(model="enhancer-1") as fake:
    fake.url      # base URL including /v1, for IMAGEGEN_ENHANCE_URL
    fake.calls    # every request received (SeenChat); `await fake.calls.wait_for(n)`
    fake.script(ChatReply(content='{"prompt": "...", "negative_prompt": "..."}'))
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import Pauses, Seen, drop_connection, serve_on_loopback

_STYLE_LINE = re.compile(r"^Style: (?P<style>.+)$", re.MULTILINE)
_PROMPT_LINE = re.compile(r"^Prompt: (?P<prompt>.*)\Z", re.MULTILINE | re.DOTALL)


@dataclass
class ChatReply:
    """One scripted answer; the default echoes the prompt, enriched, as JSON."""

    status: int = 200
    #: the assistant message's content; None for the default JSON answer
    content: str | None = None
    #: a whole body to send instead of a completion (for unusable replies)
    raw_body: str | None = None
    message: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass
class SeenChat:
    """One request as the chat-completions endpoint received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    #: what the user message named as the style and the prompt
    style: str
    prompt: str

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def user_message(self) -> str:
        return next(
            (str(m.get("content", "")) for m in self.messages if m.get("role") == "user"), ""
        )


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


class ChatFake:
    """The fake server; see the module docstring."""

    def __init__(self, model: str, api_key: str | None) -> None:
        self.model = model
        self.api_key = api_key
        self.calls: Seen[SeenChat] = Seen()
        self.refused: list[str] = []
        self._script: list[ChatReply] = []
        self.url = ""
        self.pauses = Pauses()

    def script(self, *replies: ChatReply) -> None:
        self._script.extend(replies)

    def _invalid(self, body: Any, headers: dict[str, str]) -> web.Response | None:
        if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if not isinstance(body, dict) or not body.get("model"):
            return _error(400, "you must provide a model parameter")
        if body["model"] != self.model:
            return _error(404, f"The model `{body['model']}` does not exist.", "model_not_found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' is a required property")
        for message in messages:
            if (
                not isinstance(message, dict)
                or not message.get("role")
                or not message.get("content")
            ):
                return _error(400, "each message needs a role and content")
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = dict(request.headers)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        invalid = self._invalid(body, headers)
        if invalid is not None:
            self.refused.append(invalid.text or "")
            return invalid
        user = next((m["content"] for m in body["messages"] if m["role"] == "user"), "")
        style, prompt = _STYLE_LINE.search(user), _PROMPT_LINE.search(user)
        if style is None or prompt is None:
            self.refused.append("no style or prompt line")
            return _error(400, "the fake wants 'Style: ...' and 'Prompt: ...' lines")
        await self.calls.record(
            SeenChat(request.path, headers, body, style["style"].strip(), prompt["prompt"])
        )
        reply = self._script.pop(0) if self._script else ChatReply()
        if reply.delay:
            await self.pauses.sleep(reply.delay)
        if reply.drop:
            return await drop_connection(request)
        if reply.status != 200:
            response = _error(reply.status, reply.message, "server_error")
            response.headers.update(reply.headers)
            return response
        if reply.raw_body is not None:
            return web.Response(text=reply.raw_body, content_type="application/json")
        content = reply.content
        if content is None:
            content = json.dumps(
                {
                    "prompt": f"{prompt['prompt']}, as a {style['style'].strip()} masterpiece",
                    "negative_prompt": "blurry, extra fingers",
                }
            )
        return web.json_response(_completion(self.model, content))

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, *, model: str = "enhancer-1", api_key: str | None = None
    ) -> AsyncIterator[ChatFake]:
        fake = cls(model, api_key)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", fake._handle)
        async with serve_on_loopback(app) as url:
            fake.url = url + "/v1"
            try:
                yield fake
            finally:
                fake.pauses.stop()
