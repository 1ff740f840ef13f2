"""The prompt enhancement model: any OpenAI-compatible chat-completions server
(OpenAI, vLLM, Ollama, LiteLLM...), configured by its own settings, never by OPENAI_*.

    POST {IMAGEGEN_ENHANCE_URL}/chat/completions        JSON
    Authorization: Bearer {IMAGEGEN_ENHANCE_API_KEY}    (left out when no key is set)
    {"model": IMAGEGEN_ENHANCE_MODEL, "temperature": 0, "max_tokens": 1024,
     "messages": [{"role": "system", "content": the instructions below},
                  {"role": "user", "content": "Style: cinematic\\n...\\nPrompt: <prompt>"}]}
    -> {"choices": [{"message": {"content": "{\\"prompt\\": ..., \\"negative_prompt\\": ...}"}}]}

The user message names the style (or `none`), the style's lighting, composition and
quality phrases as hints, and the prompt. The answer is read as the JSON object the
instructions ask for (inside a code fence too); an answer that is plain text is taken
as the prompt, with no negative prompt.

Every failure is IMG_002 and retryable (UNAVAILABLE: an enhancement changes nothing
until it succeeds, so asking again is safe): transport errors and timeouts, any HTTP
error status (read by the shared classifier, providers/http_failures.py, whose message
and metadata are kept), and a reply without a message.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx

from imagegen.domain.enhancement import EnhancedText
from imagegen.domain.errors import ImageGenError, ProviderFailed
from imagegen.domain.models import Style
from imagegen.domain.phrases import StylePhrases
from imagegen.providers.http_failures import raise_for_status, transport_errors

SYSTEM_PROMPT = (
    "You improve prompts for an AI image generator. Keep the user's subject and intent; "
    "add concrete detail about the subject, lighting, composition and quality that suits "
    "the requested style. Answer with one JSON object and nothing else: "
    '{"prompt": "<the improved prompt, at most 4000 characters>", '
    '"negative_prompt": "<comma-separated things the image must not show, at most 1000 '
    'characters>"}.'
)
MAX_TOKENS = 1024
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def user_message(prompt: str, style: Style | None, phrases: StylePhrases) -> str:
    """What the model is asked: the style, the style's phrases as hints, the prompt."""
    return "\n".join(
        [
            f"Style: {style.value if style is not None else 'none'}",
            f"Lighting ideas: {'; '.join(phrases.lighting)}",
            f"Composition ideas: {'; '.join(phrases.composition)}",
            f"Quality ideas: {'; '.join(phrases.quality)}",
            f"Things to avoid: {'; '.join(phrases.negative)}",
            f"Prompt: {prompt}",
        ]
    )


def parse_answer(content: str) -> EnhancedText:
    """The model's answer: the JSON object asked for, else the whole text as the prompt."""
    text = _FENCE.sub("", content.strip())
    start, end = text.find("{"), text.rfind("}")
    if start >= 0 and end > start:
        try:
            data = json.loads(text[start : end + 1])
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("prompt"), str):
            negative = data.get("negative_prompt")
            if isinstance(negative, list):
                negative = ", ".join(str(n) for n in negative)
            return EnhancedText(data["prompt"], negative if isinstance(negative, str) else "")
    return EnhancedText(text, "")


class ChatEnhancer:
    """An OpenAI-compatible chat model behind the ChatModel port."""

    def __init__(
        self,
        base_url: str,
        model: str,
        client: httpx.AsyncClient,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._client = client
        self._api_key = api_key
        self._timeout = timeout

    @property
    def name(self) -> str:
        """The model's name, as configured."""
        return self._model

    async def rewrite(
        self, prompt: str, style: Style | None, phrases: StylePhrases
    ) -> EnhancedText:
        """One chat completion; IMG_002 (retryable) for any failure."""
        body: dict[str, Any] = {
            "model": self._model,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user_message(prompt, style, phrases)},
            ],
        }
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            with transport_errors(provider="prompt enhancement", timeout=self._timeout):
                async with asyncio.timeout(self._timeout):
                    reply = await self._client.post(
                        self._url, json=body, headers=headers, timeout=self._timeout
                    )
            raise_for_status(
                reply,
                provider="prompt enhancement",
                key_setting="IMAGEGEN_ENHANCE_API_KEY",
                detail=_error_detail(reply),
            )
            return parse_answer(_content(reply))
        except ImageGenError as exc:
            raise ProviderFailed(
                exc.message,
                retryable=True,
                retry_after=getattr(exc, "retry_after", None),
                metadata={**exc.metadata, "model": self._model},
            ) from exc


def _error_detail(reply: httpx.Response) -> str:
    if reply.status_code < 400:
        return ""
    try:
        error = reply.json().get("error")
    except (ValueError, AttributeError):
        return ""
    if isinstance(error, dict):
        return str(error.get("message", ""))
    return str(error or "")


def _content(reply: httpx.Response) -> str:
    try:
        content = reply.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str) or not content.strip():
        raise ProviderFailed(
            "the prompt enhancement model answered without a message; try again",
            retryable=True,
        )
    return content
