"""OpenAI Images against a local server speaking its wire format."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from imagegen.v1 import common_pb2, generation_pb2
from PIL import Image

from imagegen.domain.errors import ContentPolicyRefused, ProviderFailed, ProviderNotConfigured
from imagegen.domain.models import ImageFormat, Size, Style
from imagegen.providers.base import ProviderRequest, ProviderUnavailable, SourceImage
from imagegen.providers.openai import OpenAIProvider
from imagegen.providers.prompting import STYLE_WORDS
from imagegen.providers.resilience import ResilientProvider
from tests.fakes.forge_server import png_bytes
from tests.fakes.openai_server import OpenAIFake, OpenAIReply
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import generate

E = generation_pb2


@pytest.fixture
async def fake_and_client() -> AsyncIterator[tuple[OpenAIFake, httpx.AsyncClient]]:
    async with OpenAIFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        yield fake, http


async def test_generation_streams_partials_as_previews(fake_and_client) -> None:
    fake, http = fake_and_client
    seen: list[tuple[int, str, bytes | None]] = []

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        seen.append((percent, stage, preview))

    provider = OpenAIProvider(fake.url, "sk-test", http)
    reply = await provider.generate(
        ProviderRequest(prompt="a fox", size=Size(1024, 1536)), progress
    )
    assert Image.open(io.BytesIO(reply.data)).size == (1024, 1536)
    call = fake.calls[0]
    assert call.path == "/v1/images/generations"
    assert call.headers["Authorization"] == "Bearer sk-test"
    assert call.fields["prompt"] == "a fox" and call.fields["size"] == "1024x1536"
    assert call.fields["stream"] is True and call.fields["partial_images"] == 2
    previews = [p for _, stage, p in seen if stage == "partial" and p]
    assert len(previews) == 2 and len(set(previews)) == 2
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)


async def test_edit_sends_images_and_mask_as_multipart(fake_and_client) -> None:
    fake, http = fake_and_client
    source = SourceImage(png_bytes(32, 32), "image/png", 32, 32)
    mask = SourceImage(png_bytes(32, 32, (0, 0, 0)), "image/png", 32, 32)

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        return None

    provider = OpenAIProvider(fake.url, "sk-test", http)
    await provider.generate(
        ProviderRequest(prompt="add a hat", sources=(source,), mask=mask), progress
    )
    call = fake.calls[0]
    assert call.path == "/v1/images/edits"
    assert call.fields["prompt"] == "add a hat" and call.fields["model"] == "gpt-image-1"
    assert [f[1] for f in call.files["image[]"]] == [source.data]
    assert call.files["mask"][0][1] == mask.data


async def test_content_policy_is_img_010_and_not_retried(fake_and_client) -> None:
    fake, http = fake_and_client
    fake.default = OpenAIReply(status=400, error_code="moderation_blocked")
    provider = ResilientProvider(OpenAIProvider(fake.url, "sk-test", http))

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        return None

    with pytest.raises(ContentPolicyRefused) as caught:
        await provider.generate(ProviderRequest(prompt="something refused"), progress)
    assert caught.value.code == "IMG_010"
    assert len(fake.calls) == 1


async def test_429_with_retry_after_is_honoured(fake_and_client) -> None:
    fake, http = fake_and_client
    fake.script(OpenAIReply(status=429, headers={"Retry-After": "1.5"}))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        return None

    provider = ResilientProvider(OpenAIProvider(fake.url, "sk-test", http), sleep=sleep)
    await provider.generate(ProviderRequest(prompt="a fox", timeout=30), progress)
    assert len(fake.calls) == 2 and sleeps[0] >= 1.5
    bare = OpenAIProvider(fake.url, "sk-test", http)
    fake.script(OpenAIReply(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(ProviderFailed) as limited:
        await bare.generate(ProviderRequest(prompt="a fox"), progress)
    assert limited.value.retryable and limited.value.retry_after == timedelta(seconds=7)


async def test_missing_configuration_sends_nothing(fake_and_client) -> None:
    fake, http = fake_and_client

    async def progress(percent: int, stage: str, preview: bytes | None) -> None:
        return None

    for provider in (OpenAIProvider(fake.url, None, http), OpenAIProvider(None, "sk", http)):
        with pytest.raises(ProviderNotConfigured):
            await provider.generate(ProviderRequest(prompt="a fox"), progress)
    assert fake.calls == []


async def test_partials_reach_the_caller_as_progress_previews(
    tmp_path: Path, database_url: str
) -> None:
    async with OpenAIFake.start() as fake:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(
                server.grpc_port, common_pb2.GenerationSpec(prompt="a fox", provider="openai")
            )
            refused_fake_reply = OpenAIReply(status=400, error_code="content_policy_violation")
            fake.script(refused_fake_reply)
            refused, refused_err = await generate(
                server.grpc_port, common_pb2.GenerationSpec(prompt="no", provider="openai")
            )
    assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    previews = [
        e for e in events if e.type == E.GENERATION_EVENT_TYPE_PROGRESS and e.progress.preview
    ]
    assert len(previews) == 2
    assert refused[-1].error.code == "IMG_010" and refused_err is not None


async def quiet(percent: int, stage: str, preview: bytes | None) -> None:
    return None


@pytest.mark.parametrize(
    ("asked", "sent"),
    [
        (Size(256, 256), "1024x1024"),
        (Size(512, 512), "1024x1024"),
        (Size(1024, 1024), "1024x1024"),
        (Size(1024, 1536), "1024x1536"),
        (Size(1536, 1024), "1536x1024"),
        (Size(300, 200), "1536x1024"),
        (Size(200, 300), "1024x1536"),
    ],
    ids=str,
)
async def test_the_nearest_size_gpt_image_takes_is_asked_for(
    fake_and_client, asked: Size, sent: str
) -> None:
    fake, http = fake_and_client
    await OpenAIProvider(fake.url, "sk", http).generate(
        ProviderRequest(prompt="a fox", size=asked), quiet
    )
    (call,) = fake.calls
    assert call.size == sent


@pytest.mark.parametrize("output_format", list(ImageFormat), ids=str)
async def test_the_asked_format_is_asked_for_and_reported(
    fake_and_client, output_format: ImageFormat
) -> None:
    fake, http = fake_and_client
    reply = await OpenAIProvider(fake.url, "sk", http).generate(
        ProviderRequest(prompt="a fox", output_format=output_format), quiet
    )
    (call,) = fake.calls
    assert call.output_format == output_format.value
    assert reply.mime_type == output_format.mime_type
    with Image.open(io.BytesIO(reply.data)) as image:
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format]


@pytest.mark.parametrize("style", list(Style), ids=str)
async def test_every_style_and_the_negative_prompt_are_folded(
    fake_and_client, style: Style
) -> None:
    fake, http = fake_and_client
    await OpenAIProvider(fake.url, "sk", http).generate(
        ProviderRequest(prompt="a fox", style=style, negative_prompt="snow", seed=7), quiet
    )
    (call,) = fake.calls
    assert call.prompt == f"a fox, {STYLE_WORDS[style]}. Avoid: snow"
    assert (call.model, call.n) == ("gpt-image-1", 1)
    assert "seed" not in call.fields, "the Images API takes no seed"


async def test_an_edit_sends_size_model_format_sources_and_mask(fake_and_client) -> None:
    fake, http = fake_and_client
    first = SourceImage(png_bytes(32, 32), "image/png", 32, 32)
    second = SourceImage(png_bytes(48, 32, (0, 0, 255)), "image/png", 48, 32)
    mask = SourceImage(png_bytes(32, 32, (0, 0, 0)), "image/png", 32, 32)
    reply = await OpenAIProvider(fake.url, "sk", http).generate(
        ProviderRequest(
            prompt="add a hat",
            style=Style.VINTAGE,
            model="gpt-image-1-mini",
            sources=(first, second),
            mask=mask,
            resize_to=Size(1536, 1024),
            output_format=ImageFormat.WEBP,
        ),
        quiet,
    )
    (call,) = fake.calls
    assert call.is_edit and call.images == [first.data, second.data] and call.mask == mask.data
    assert (call.size, call.model, call.output_format, call.n) == (
        "1536x1024",
        "gpt-image-1-mini",
        "webp",
        1,
    )
    assert call.prompt == "add a hat, vintage photo style, faded warm film tones, grain"
    assert reply.model == "gpt-image-1-mini" and reply.mime_type == "image/webp"


async def test_a_reply_of_another_size_is_returned_as_it_came(fake_and_client) -> None:
    fake, http = fake_and_client
    fake.default = OpenAIReply(size=(640, 480))
    reply = await OpenAIProvider(fake.url, "sk", http).generate(
        ProviderRequest(prompt="a fox", size=Size(1024, 1024)), quiet
    )
    with Image.open(io.BytesIO(reply.data)) as image:
        assert image.size == (640, 480)


async def test_failures_in_openais_words(fake_and_client) -> None:
    fake, http = fake_and_client
    provider = OpenAIProvider(fake.url, "sk", http)
    fake.script(
        OpenAIReply(status=400, error_code="invalid_value", message="Invalid size"),
        OpenAIReply(status=401, error_code="invalid_api_key"),
        OpenAIReply(status=500),
        OpenAIReply(drop=True),
    )
    outcomes: list[ProviderFailed] = []
    for _ in range(4):
        with pytest.raises(ProviderFailed) as caught:
            await provider.generate(ProviderRequest(prompt="a fox"), quiet)
        outcomes.append(caught.value)
    bad, key, failing, dropped = outcomes
    assert type(bad) is ProviderFailed and "Invalid size" in bad.message and not bad.retryable
    assert "OPENAI_API_KEY" in key.message and not key.retryable
    assert isinstance(failing, ProviderUnavailable) and failing.retryable
    assert isinstance(dropped, ProviderUnavailable) and not dropped.retryable


async def test_a_slow_reply_ends_at_the_deadline_and_is_not_retryable(fake_and_client) -> None:
    fake, http = fake_and_client
    fake.default = OpenAIReply(delay=10)
    with pytest.raises(ProviderFailed) as caught:
        # A configured 0.5 s deadline, held to with a generous margin (the fake waits 10 s).
        await asyncio.wait_for(
            OpenAIProvider(fake.url, "sk", http).generate(
                ProviderRequest(prompt="a fox", timeout=0.5), quiet
            ),
            timeout=5,
        )
    assert not caught.value.retryable and "did not answer" in caught.value.message


async def test_through_the_server_256_and_webp_reach_openai_in_its_own_terms(
    tmp_path: Path, database_url: str
) -> None:
    async with OpenAIFake.start() as fake:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt="a fox",
                    provider="openai",
                    size=common_pb2.ImageSize(width=256, height=256),
                    format=common_pb2.IMAGE_FORMAT_WEBP,
                    style=common_pb2.STYLE_MODERN,
                    model="gpt-image-1-mini",
                ),
            )
    assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    (call,) = fake.calls
    assert (call.size, call.output_format, call.model) == ("1024x1024", "webp", "gpt-image-1-mini")
    assert call.prompt == "a fox, modern design style, clean geometry, crisp contrast"
