"""The `openai` moderator against a local server speaking the moderation endpoint's wire
format: what it sends, how categories and scores map to ours, and every way it fails."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from imagegen.domain.errors import ModerationUnavailable
from imagegen.domain.moderation import Category
from imagegen.providers.openai_moderation import OpenAIModerator
from tests.fakes.openai_moderation_server import ModerationFake


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


async def test_sends_every_text_and_maps_scores_to_our_categories(
    http: httpx.AsyncClient,
) -> None:
    keywords = {
        "gore": ("violence/graphic", 0.91),
        "fight": ("violence", 0.4),
        "minor": ("sexual/minors", 0.3),
        "hint": ("sexual", 0.2),
    }
    async with ModerationFake.start(keywords=keywords) as fake:
        moderator = OpenAIModerator(fake.url, "sk-mod", http, timeout=timedelta(seconds=5))
        verdicts = await moderator.moderate(["gore and a fight", "a minor hint", "a lighthouse"])
    [seen] = fake.requests
    assert seen.path == "/v1/moderations"
    assert seen.headers["Authorization"] == "Bearer sk-mod"
    assert seen.body == {
        "model": "omni-moderation-latest",
        "input": ["gore and a fight", "a minor hint", "a lighthouse"],
    }
    first, second, third = (dict(v.scores) for v in verdicts)
    # violence/graphic and violence fold into ours, keeping the higher score.
    assert first[Category.VIOLENCE] == pytest.approx(0.91)
    assert second[Category.SEXUAL_MINORS] == pytest.approx(0.3)
    assert second[Category.SEXUAL] == pytest.approx(0.2)
    assert set(first) == set(Category)  # every category is scored
    assert max(third.values()) < 0.01


async def test_without_a_key_no_authorization_is_sent(http: httpx.AsyncClient) -> None:
    async with ModerationFake.start() as fake:
        await OpenAIModerator(fake.url, None, http, timeout=timedelta(seconds=5)).moderate(["x"])
    assert "Authorization" not in fake.requests[0].headers


@pytest.mark.parametrize("status", [500, 502, 401, 400])
async def test_an_error_answer_is_unavailable(http: httpx.AsyncClient, status: int) -> None:
    async with ModerationFake.start(status=status) as fake:
        moderator = OpenAIModerator(fake.url, "k", http, timeout=timedelta(seconds=5))
        with pytest.raises(ModerationUnavailable) as caught:
            await moderator.moderate(["a fox"])
    assert caught.value.code == "IMG_012"
    assert caught.value.metadata["status"] == str(status)


async def test_a_429_passes_its_retry_after_on(http: httpx.AsyncClient) -> None:
    async with ModerationFake.start(status=429, retry_after="7") as fake:
        moderator = OpenAIModerator(fake.url, "k", http, timeout=timedelta(seconds=5))
        with pytest.raises(ModerationUnavailable) as caught:
            await moderator.moderate(["a fox"])
    assert caught.value.retry_after == timedelta(seconds=7)


async def test_a_stalled_server_times_out_as_unavailable(http: httpx.AsyncClient) -> None:
    async with ModerationFake.start(stalled=True) as fake:
        moderator = OpenAIModerator(fake.url, "k", http, timeout=timedelta(seconds=0.2))
        with pytest.raises(ModerationUnavailable, match="did not answer"):
            await moderator.moderate(["a fox"])
    assert len(fake.requests) == 1


async def test_a_closed_port_is_unavailable(http: httpx.AsyncClient) -> None:
    async with ModerationFake.start() as fake:
        url = fake.url
    moderator = OpenAIModerator(url, "k", http, timeout=timedelta(seconds=2))
    with pytest.raises(ModerationUnavailable, match="could not be reached"):
        await moderator.moderate(["a fox"])


async def test_an_unreadable_reply_is_unavailable() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if len(json.loads(request.content)["input"]) == 2:
            return httpx.Response(200, json={"results": [{"category_scores": {}}]})
        return httpx.Response(200, text="<html>proxy error</html>")

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        moderator = OpenAIModerator("http://127.0.0.1:9", "k", client, timeout=timedelta(1))
        with pytest.raises(ModerationUnavailable, match="not a moderation result"):
            await moderator.moderate(["a"])
        with pytest.raises(ModerationUnavailable, match="1 results for 2 texts"):
            await moderator.moderate(["a", "b"])
