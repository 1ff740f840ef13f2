"""The Forge provider against a local server speaking its wire format."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from PIL import Image

from imagegen.domain.errors import ContentPolicyRefused, ProviderFailed, ProviderNotConfigured
from imagegen.domain.models import ImageFormat, Size, Style
from imagegen.providers.base import ProviderRequest, ProviderUnavailable, SourceImage
from imagegen.providers.forge import ForgeProvider
from imagegen.providers.prompting import STYLE_WORDS
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


@pytest.mark.parametrize("style", list(Style), ids=str)
async def test_every_style_is_folded_into_the_prompt_and_nothing_else_is_sent(
    http: httpx.AsyncClient, style: Style
) -> None:
    async with ForgeFake.start() as fake:
        provider = ForgeProvider(fake.url, "k", http)
        await provider.generate(
            ProviderRequest(
                prompt="a fox",
                style=style,
                size=Size(1536, 1024),
                seed=42,
                model="forge-image",
                output_format=ImageFormat.WEBP,
            ),
            no_progress,
        )
    (seen,) = fake.requests
    assert seen.json == {"prompt": f"a fox, {STYLE_WORDS[style]}"}, "the API has no other field"


async def test_the_seeds_new_presets_read_as_themselves(http: httpx.AsyncClient) -> None:
    async with ForgeFake.start() as fake:
        provider = ForgeProvider(fake.url, "k", http)
        for style in (Style.CARTOON, Style.MINIMALIST, Style.VINTAGE):
            await provider.generate(ProviderRequest(prompt="a fox", style=style), no_progress)
    assert [r.prompt for r in fake.requests] == [
        "a fox, cartoon style, bold outlines, flat saturated colors",
        "a fox, minimalist style, few elements, generous empty space, restrained palette",
        "a fox, vintage photo style, faded warm film tones, grain",
    ]


async def test_an_edit_sends_every_source_and_the_folded_prompt(http: httpx.AsyncClient) -> None:
    first = SourceImage(png_bytes(32, 32), "image/png", 32, 32)
    second = SourceImage(png_bytes(16, 8, (0, 0, 255)), "image/png", 16, 8)
    async with ForgeFake.start() as fake:
        provider = ForgeProvider(fake.url, "k", http)
        await provider.generate(
            ProviderRequest(
                prompt="blend them",
                style=Style.ABSTRACT,
                negative_prompt="text",
                sources=(first, second),
                resize_to=Size(256, 256),
            ),
            no_progress,
        )
    (seen,) = fake.requests
    assert set(seen.json) == {"prompt", "original_images"}
    assert seen.prompt == (
        "blend them, abstract art, bold shapes, color and texture over subject. Avoid: text"
    )
    assert seen.original_images == [first.data, second.data]


async def test_a_reply_of_another_size_is_returned_as_it_came(http: httpx.AsyncClient) -> None:
    async with ForgeFake.start() as fake:
        fake.default = Reply(size=(1536, 1024))
        provider = ForgeProvider(fake.url, "k", http)
        reply = await provider.generate(
            ProviderRequest(prompt="a fox", size=Size(256, 256)), no_progress
        )
    with Image.open(io.BytesIO(reply.data)) as image:
        assert image.size == (1536, 1024), "the pipeline, not the provider, fits it"


async def test_a_content_policy_refusal_is_img_010(http: httpx.AsyncClient) -> None:
    async with ForgeFake.start() as fake:
        provider = ForgeProvider(fake.url, "k", http)
        fake.script(
            Reply.policy_refusal(),
            Reply.error(400, "Blocked by the safety system", code="invalid_argument"),
            Reply.error(400, "prompt must not be empty"),
            Reply.error(503, "the safety service is down"),
        )
        outcomes: list[Exception] = []
        for _ in range(4):
            with pytest.raises((ContentPolicyRefused, ProviderFailed)) as caught:
                await provider.generate(ProviderRequest(prompt="a fox"), no_progress)
            outcomes.append(caught.value)
    by_detail, by_message, bad_request, unavailable = outcomes
    assert isinstance(by_detail, ContentPolicyRefused) and by_detail.code == "IMG_010"
    assert isinstance(by_message, ContentPolicyRefused)
    assert type(bad_request) is ProviderFailed and not bad_request.retryable
    assert "prompt must not be empty" in bad_request.message
    assert bad_request.metadata["provider_code"] == "invalid_argument"
    assert isinstance(unavailable, ProviderUnavailable) and unavailable.retryable
