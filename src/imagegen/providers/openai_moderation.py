"""`openai` moderator: the OpenAI moderation endpoint.

    POST {IMAGEGEN_MODERATION_URL}/moderations
    Authorization: Bearer {IMAGEGEN_MODERATION_API_KEY}
    {"model": "omni-moderation-latest", "input": ["text 1", "text 2"]}
 -> {"id": ..., "model": ..., "results": [{"flagged": bool,
        "categories": {"sexual": bool, ...}, "category_scores": {"sexual": 0.93, ...}}, ...]}

One result per input, in order. Its categories are mapped onto ours (several of theirs
fold into one of ours, which keeps the highest score); categories we do not know are
ignored, so a new one on their side changes nothing here. Every failure (connection,
timeout, a non-200 answer, a reply we cannot read) is ModerationUnavailable: what then
happens to the request is the plan's policy, not this adapter's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import httpx

from imagegen.domain.errors import ModerationUnavailable
from imagegen.domain.moderation import Category, Verdict
from imagegen.providers.http_headers import retry_after

log = logging.getLogger(__name__)

MODEL = "omni-moderation-latest"

#: OpenAI's category names -> ours.
CATEGORY_MAP: Mapping[str, Category] = {
    "sexual": Category.SEXUAL,
    "sexual/minors": Category.SEXUAL_MINORS,
    "violence": Category.VIOLENCE,
    "violence/graphic": Category.VIOLENCE,
    "hate": Category.HATE,
    "hate/threatening": Category.HATE,
    "harassment": Category.HARASSMENT,
    "harassment/threatening": Category.HARASSMENT,
    "self-harm": Category.SELF_HARM,
    "self-harm/intent": Category.SELF_HARM,
    "self-harm/instructions": Category.SELF_HARM,
    "illicit": Category.ILLICIT,
    "illicit/violent": Category.ILLICIT,
}


def verdict_from_result(result: Mapping[str, Any]) -> Verdict:
    """Our verdict for one OpenAI result: the highest mapped score per category."""
    raw_scores = result.get("category_scores")
    if not isinstance(raw_scores, Mapping):
        raise TypeError("a result without category_scores")
    scores: dict[Category, float] = {}
    for name, value in raw_scores.items():
        category = CATEGORY_MAP.get(str(name))
        if category is None:
            continue
        score = min(max(float(value), 0.0), 1.0)
        scores[category] = max(scores.get(category, 0.0), score)
    return Verdict(scores)


class OpenAIModerator:
    """The OpenAI moderation endpoint behind the Moderator protocol."""

    id = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        client: httpx.AsyncClient,
        *,
        timeout: timedelta,
        model: str = MODEL,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key or ""
        self._client = client
        self._timeout = timeout.total_seconds()
        self._model = model

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """One verdict per text, in order; ModerationUnavailable when it cannot say."""
        if not texts:
            return []
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            # httpx's timeout bounds each phase; a server that trickles its answer is
            # bounded as a whole here.
            async with asyncio.timeout(self._timeout):
                reply = await self._client.post(
                    f"{self._base_url}/moderations",
                    json={"model": self._model, "input": list(texts)},
                    headers=headers,
                    timeout=self._timeout,
                )
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise ModerationUnavailable(
                f"the openai moderator did not answer within {self._timeout:g}s",
                metadata={"moderator": self.id},
            ) from exc
        except httpx.HTTPError as exc:
            raise ModerationUnavailable(
                f"the openai moderator could not be reached ({type(exc).__name__})",
                metadata={"moderator": self.id},
            ) from exc
        if reply.status_code != 200:
            if reply.status_code in (401, 403):
                # Our configuration, not an outage: say so loudly in our log.
                log.error(
                    "the openai moderator refused our key (HTTP %s); check "
                    "IMAGEGEN_MODERATION_API_KEY",
                    reply.status_code,
                    extra={"event": "moderation.unauthorised"},
                )
            raise ModerationUnavailable(
                f"the openai moderator answered HTTP {reply.status_code}",
                retry_after=retry_after(reply),
                metadata={"moderator": self.id, "status": str(reply.status_code)},
            )
        try:
            results = reply.json()["results"]
            verdicts = [verdict_from_result(result) for result in results]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModerationUnavailable(
                "the openai moderator answered something that is not a moderation result",
                metadata={"moderator": self.id},
            ) from exc
        if len(verdicts) != len(texts):
            raise ModerationUnavailable(
                f"the openai moderator answered {len(verdicts)} results for {len(texts)} texts",
                metadata={"moderator": self.id},
            )
        return verdicts
