"""The Forge provider against a local server speaking its wire format."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from imagegen.domain.errors import ProviderFailed, ProviderNotConfigured
from imagegen.domain.models import Style
from imagegen.providers.base import ProviderRequest, SourceImage
from imagegen.providers.forge import ForgeProvider
from tests.fakes.forge_server import ForgeFake, Reply, png_bytes


async def no_progress(percent: int, stage: str, preview: bytes | None) -> None:
    return None


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


async def test_wire_format_of_a_generation_and_an_edit(http: httpx.AsyncClient) -> None:
    image = png_bytes(32, 32)
    async with ForgeFake.start() as fake:
        fake.default = Reply(image=image)
        provider = ForgeProvider(fake.url, "secret-key", http)
        reply = await provider.generate(
            ProviderRequest(prompt="a fox", style=Style.SKETCH, negative_prompt="people"),
            no_progress,
        )
        source = SourceImage(data=b"\x89PNGsource", mime_type="image/png", width=1, height=1)
        await provider.generate(
            ProviderRequest(prompt="make it blue", sources=(source,)), no_progress
        )
    assert reply.data == image and reply.mime_type == "image/png"
    first, second = fake.requests
    assert first.headers["Authorization"] == "Bearer secret-key"
    assert first.headers["Content-Type"] == "application/json"
    assert first.json == {"prompt": "a fox, pencil sketch style, graphite lines. Avoid: people"}
    assert second.json == {
        "prompt": "make it blue",
        "original_images": [{"b64Json": "iVBOR3NvdXJjZQ==", "mimeType": "image/png"}],
    }


@pytest.mark.parametrize(("url", "key"), [(None, "k"), ("http://127.0.0.1:9", None), (None, None)])
async def test_missing_credentials_send_nothing(
    http: httpx.AsyncClient, url: str | None, key: str | None
) -> None:
    async with ForgeFake.start() as fake:
        provider = ForgeProvider(url if url is None else fake.url, key, http)
        with pytest.raises(ProviderNotConfigured):
            await provider.generate(ProviderRequest(prompt="a fox"), no_progress)
    assert fake.requests == []


async def test_http_failures_are_classified(http: httpx.AsyncClient) -> None:
    async with ForgeFake.start() as fake:
        provider = ForgeProvider(fake.url, "k", http)
        fake.script(
            Reply(status=503, body=b"{}"),
            Reply(status=429, body=b"{}", headers={"Retry-After": "7"}),
            Reply(status=401, body=b"{}"),
            Reply(body=b'{"image": {"b64Json": "@@@", "mimeType": "image/png"}}'),
        )
        outcomes = []
        for _ in range(4):
            with pytest.raises(ProviderFailed) as caught:
                await provider.generate(ProviderRequest(prompt="a fox"), no_progress)
            outcomes.append(caught.value)
    unavailable, limited, refused, garbled = outcomes
    assert unavailable.retryable and limited.retryable
    assert limited.retry_after == timedelta(seconds=7)
    assert not refused.retryable and "BUILT_IN_FORGE_API_KEY" in refused.message
    assert not garbled.retryable


async def test_timeout_ends_within_the_deadline_and_is_not_retryable(
    http: httpx.AsyncClient,
) -> None:
    async with ForgeFake.start() as fake:
        fake.default = Reply(image=png_bytes(), delay=5)
        provider = ForgeProvider(fake.url, "k", http)
        with pytest.raises(ProviderFailed) as caught:
            # A configured 0.5 s deadline, held to with a generous margin (the fake waits 5 s).
            await asyncio.wait_for(
                provider.generate(ProviderRequest(prompt="a fox", timeout=0.5), no_progress),
                timeout=4,
            )
    assert not caught.value.retryable, "an ambiguous timeout may have billed: no blind retry"
    assert "did not answer" in caught.value.message
