"""PromptAssistantService through a real server: suggestions from the caller's own
prompts only, shared templates for their sub-account only, kept above deleted, the
request's edges; enhancement by the local enhancer and by a chat model (a local fake
speaking the chat-completions wire format), its limits, failures, price and usage."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
    prompts_pb2,
    prompts_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

from imagegen.domain.errors import ImageGenError
from imagegen.domain.models import Identity, Style
from imagegen.domain.phrases import builtin_phrases
from imagegen.domain.plans import PlanTable
from imagegen.domain.pricing import PriceTable
from imagegen.identity import mint_token
from imagegen.providers.chat_enhancer import ChatEnhancer
from imagegen.repositories.db import open_pool
from imagegen.repositories.unit_of_work import PostgresDatabase
from imagegen.server import RunningServer
from imagegen.services.prompts import EnhancementSettings, PromptEnhancement
from tests.fakes.chat_server import ChatFake, ChatReply
from tests.inprocess import TEST_JWT_KEY, serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, reason_of

P, E, L, T, U = prompts_pb2, generation_pb2, library_pb2, templates_pb2, usage_pb2
SMALL = common_pb2.ImageSize(width=256, height=256)


def md(user: str, team: str = "") -> tuple[tuple[str, str], ...]:
    token = mint_token(TEST_JWT_KEY, user_id=user, sub_account=team)
    return (("authorization", f"Bearer {token}"),)


class Client:
    """Stubs on one channel to a served process."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.prompts = prompts_pb2_grpc.PromptAssistantServiceStub(channel)
        self.generations = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        self.library = library_pb2_grpc.ImageLibraryServiceStub(channel)
        self.templates = templates_pb2_grpc.PromptTemplateServiceStub(channel)
        self.usage = usage_pb2_grpc.UsageServiceStub(channel)

    async def make_images(self, user: str, prompt: str, **spec: object) -> list[str]:
        """Generate with `local` as `user`; the names of the images made."""
        names = []
        async for reply in self.generations.GenerateImage(
            E.GenerateImageRequest(
                spec=common_pb2.GenerationSpec(prompt=prompt, provider="local", size=SMALL, **spec)  # type: ignore[arg-type]
            ),
            metadata=md(user),
            timeout=60,
        ):
            if reply.event.type == E.GENERATION_EVENT_TYPE_IMAGE_READY:
                names.append(reply.event.image.name)
        assert names, f"no image for {prompt!r}"
        return names

    async def suggest(
        self, user: str, text: str, *, team: str = "", limit: int = 0, style: int = 0
    ) -> list[P.PromptSuggestion]:
        reply = await self.prompts.SuggestPrompts(
            P.SuggestPromptsRequest(text=text, limit=limit, style=style),  # type: ignore[arg-type]
            metadata=md(user, team),
        )
        return list(reply.suggestions)

    async def favourite(self, user: str, image: str) -> None:
        await self.library.UpdateImage(
            L.UpdateImageRequest(
                image=common_pb2.Image(name=image, favorite=True),
                update_mask=field_mask_pb2.FieldMask(paths=["favorite"]),
            ),
            metadata=md(user),
        )


@pytest.fixture
async def served(tmp_path: Path, database_url: str) -> AsyncIterator[RunningServer]:
    async with serve_in_process(tmp_path, database_url) as server:
        yield server


@pytest.fixture
async def client(served: RunningServer) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{served.grpc_port}", options=CHANNEL_OPTIONS
    ) as channel:
        yield Client(channel)


def history(found: list[P.PromptSuggestion]) -> list[str]:
    return [s.text for s in found if s.source == P.SUGGESTION_SOURCE_HISTORY]


async def test_suggestions_never_show_another_users_prompts(client: Client) -> None:
    for user, prompts in (
        ("alice", ["a red fox at dawn", "a red fox in the snow", "Red fox portrait"]),
        ("bob", ["a red fox at dawn", "a red fox with bob's secret plan", "a red fox kit"]),
    ):
        for prompt in prompts:
            await client.make_images(user, prompt)

    alice = await client.suggest("alice", "red fox", limit=50)
    assert set(history(alice)) == {"a red fox at dawn", "a red fox in the snow", "Red fox portrait"}
    # Her prompt that starts with the text ranks first; every text appears once.
    assert history(alice)[0] == "Red fox portrait"
    assert len({s.text.lower() for s in alice}) == len(alice)
    bob = await client.suggest("bob", "a red fox", limit=50)
    assert set(history(bob)) == {
        "a red fox at dawn",
        "a red fox with bob's secret plan",
        "a red fox kit",
    }
    assert not any("secret" in s.text for s in alice)
    # Nobody sees anybody's prompts without having made their own.
    assert history(await client.suggest("carol", "red fox", limit=50)) == []
    assert history(await client.suggest("carol", "", limit=50)) == []


async def test_kept_prompts_rank_above_deleted_ones(client: Client, database_url: str) -> None:
    kept = (await client.make_images("alice", "a lighthouse at night"))[0]
    deleted = (await client.make_images("alice", "a lighthouse at noon"))[0]
    await client.make_images("alice", "a lighthouse in fog")
    # Made last (so the most recent), then deleted.
    await client.favourite("alice", kept)
    await client.library.DeleteImage(L.DeleteImageRequest(name=deleted), metadata=md("alice"))

    found = history(await client.suggest("alice", "a lighthouse"))
    assert found == ["a lighthouse at night", "a lighthouse in fog", "a lighthouse at noon"]
    # With nothing typed: the kept one (and phrases), not the others.
    empty = await client.suggest("alice", "")
    assert history(empty) == ["a lighthouse at night"]
    assert {s.source for s in empty} == {P.SUGGESTION_SOURCE_HISTORY, P.SUGGESTION_SOURCE_PHRASE}

    # Restored, it is no longer ranked as deleted; purged, it counts as deleted again.
    await client.library.UndeleteImage(L.UndeleteImageRequest(name=deleted), metadata=md("alice"))
    assert history(await client.suggest("alice", "a lighthouse at no")) == ["a lighthouse at noon"]
    conn = await asyncpg.connect(database_url)
    try:
        counts = await conn.fetchrow(
            "SELECT images_made, live_images, kept_images, deleted_images FROM prompt_history "
            "WHERE user_id = 'alice' AND prompt = 'a lighthouse at noon'"
        )
        assert tuple(counts) == (1, 1, 0, 0)
        await client.library.PurgeImage(L.PurgeImageRequest(name=deleted), metadata=md("alice"))
        counts = await conn.fetchrow(
            "SELECT images_made, live_images, kept_images, deleted_images FROM prompt_history "
            "WHERE user_id = 'alice' AND prompt = 'a lighthouse at noon'"
        )
        assert tuple(counts) == (1, 0, 0, 1)
    finally:
        await conn.close()


async def test_a_shared_template_is_suggested_to_its_sub_account_only(client: Client) -> None:
    shared = (
        await client.templates.CreatePromptTemplate(
            T.CreatePromptTemplateRequest(
                template=T.PromptTemplate(
                    display_name="Team watercolor",
                    prompt="a watercolor portrait of a {{animal}}",
                    style=common_pb2.STYLE_WATERCOLOR,
                    visibility=T.TEMPLATE_VISIBILITY_SHARED,
                    variables=[T.TemplateVariable(name="animal", required=True)],
                )
            ),
            metadata=md("alice", "team-a"),
        )
    ).template
    private = (
        await client.templates.CreatePromptTemplate(
            T.CreatePromptTemplateRequest(
                template=T.PromptTemplate(
                    display_name="Mine", prompt="a watercolor of my private garden"
                )
            ),
            metadata=md("alice", "team-a"),
        )
    ).template

    def templates(found: list[P.PromptSuggestion]) -> set[str]:
        return {s.template for s in found if s.source == P.SUGGESTION_SOURCE_TEMPLATE}

    assert templates(await client.suggest("alice", "watercolor", team="team-a", limit=50)) == {
        shared.name,
        private.name,
    }
    member = await client.suggest("carol", "a watercolor", team="team-a", limit=50)
    assert templates(member) == {shared.name}
    suggestion = next(s for s in member if s.template == shared.name)
    assert suggestion.text == "a watercolor portrait of a {{animal}}"
    # By its name too.
    assert templates(await client.suggest("carol", "team water", team="team-a")) == {shared.name}
    # Another sub-account, or none, sees neither.
    assert templates(await client.suggest("bob", "watercolor", team="team-b", limit=50)) == set()
    assert templates(await client.suggest("dave", "watercolor", limit=50)) == set()


async def test_suggestion_limits_and_bad_input(client: Client) -> None:
    await client.make_images("alice", "a castle on a hill")
    assert len(await client.suggest("alice", "a castle")) == 10  # phrases fill up to 10
    assert len(await client.suggest("alice", "a castle", limit=1)) == 1
    assert 10 < len(await client.suggest("alice", "a castle", limit=50)) <= 50
    long_text = "a castle " + "x" * (4000 - 9)
    found = await client.suggest("alice", long_text, limit=50)
    # Nothing longer than a prompt may be: the phrases appended would be.
    assert all(len(s.text) <= 4000 for s in found)
    styled = await client.suggest("alice", "", style=common_pb2.STYLE_CINEMATIC)
    assert styled[0].text == "dramatic cinematic lighting"
    scores = [s.score for s in styled]
    assert scores == sorted(scores, reverse=True)

    bad: list[tuple[P.SuggestPromptsRequest, str]] = [
        (P.SuggestPromptsRequest(text="x", limit=51), "limit"),
        (P.SuggestPromptsRequest(text="x", limit=-1), "limit"),
        (P.SuggestPromptsRequest(text="y" * 4001), "text"),
        (P.SuggestPromptsRequest(text="a\x00b"), "text"),
        (P.SuggestPromptsRequest(text="x", style=999), "style"),  # type: ignore[arg-type]
    ]
    for request, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.prompts.SuggestPrompts(request, metadata=md("alice"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert reason_of(refused.value) == "IMG_003"
        assert field in (refused.value.details() or "")


async def usage_of(client: Client, user: str) -> list[U.UsageRecord]:
    return list(
        (await client.usage.ListUsage(U.ListUsageRequest(), metadata=md(user))).usage_records
    )


async def test_local_enhancement_is_deterministic_and_recorded(client: Client) -> None:
    request = P.EnhancePromptRequest(
        prompt="a red fox in snow",
        style=common_pb2.STYLE_CINEMATIC,
        source=common_pb2.GENERATION_SOURCE_WORKFLOW,
    )
    first = await client.prompts.EnhancePrompt(request, metadata=md("alice"))
    again = await client.prompts.EnhancePrompt(request, metadata=md("alice"))
    assert first == again
    assert first.enhancer == "local" and first.credits == 0
    assert first.prompt.startswith("a red fox in snow, ")
    assert "dramatic cinematic lighting" in first.prompt
    assert "blurry" in first.negative_prompt

    records = await usage_of(client, "alice")
    assert [(r.kind, r.source, r.status, r.provider, r.model, r.generation) for r in records] == [
        (
            U.USAGE_KIND_PROMPT_ENHANCEMENT,
            common_pb2.GENERATION_SOURCE_WORKFLOW,
            U.USAGE_STATUS_SUCCEEDED,
            "enhancer",
            "local",
            "",
        )
    ] * 2
    stats = await client.usage.GetUsageStats(U.GetUsageStatsRequest(), metadata=md("alice"))
    assert stats.totals.requests == 2
    assert [s.source for s in stats.by_source] == [common_pb2.GENERATION_SOURCE_WORKFLOW]
    chunks = [
        c.data async for c in client.usage.ExportUsage(U.ExportUsageRequest(), metadata=md("alice"))
    ]
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert [(r["kind"], r["source"], r["generation"]) for r in rows] == [
        ("prompt_enhancement", "workflow", "")
    ] * 2


async def test_generation_records_read_as_generations(client: Client) -> None:
    await client.make_images("alice", "a small boat")
    (record,) = await usage_of(client, "alice")
    assert record.kind == U.USAGE_KIND_GENERATION and record.generation


async def test_bad_enhancement_input_is_img_003_and_changes_nothing(client: Client) -> None:
    for request in (
        P.EnhancePromptRequest(prompt=""),
        P.EnhancePromptRequest(prompt="   "),
        P.EnhancePromptRequest(prompt="x" * 4001),
        P.EnhancePromptRequest(prompt="a\x00b"),
        P.EnhancePromptRequest(prompt="fine", style=999),  # type: ignore[arg-type]
        P.EnhancePromptRequest(prompt="fine", source=77),  # type: ignore[arg-type]
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.prompts.EnhancePrompt(request, metadata=md("alice"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(refused.value) == "IMG_003"
    assert await usage_of(client, "alice") == []


@pytest.fixture
async def chat() -> AsyncIterator[ChatFake]:
    async with ChatFake.start(model="enhancer-1", api_key="chat-key") as fake:
        yield fake


def chat_env(fake: ChatFake, **extra: str) -> dict[str, str]:
    return {
        "IMAGEGEN_ENHANCE_URL": fake.url,
        "IMAGEGEN_ENHANCE_MODEL": fake.model,
        "IMAGEGEN_ENHANCE_API_KEY": "chat-key",
        "IMAGEGEN_ENHANCE_TIMEOUT": "5",
        **extra,
    }


async def test_the_chat_model_gets_the_style_and_prompt_and_its_answer_is_used(
    tmp_path: Path, database_url: str, chat: ChatFake
) -> None:
    async with (
        serve_in_process(tmp_path, database_url, env=chat_env(chat)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        client = Client(ch)
        answer = await client.prompts.EnhancePrompt(
            P.EnhancePromptRequest(prompt="a quiet harbour", style=common_pb2.STYLE_WATERCOLOR),
            metadata=md("alice"),
        )
        (seen,) = chat.calls
        assert (seen.style, seen.prompt, seen.model) == (
            "watercolor",
            "a quiet harbour",
            "enhancer-1",
        )
        assert "soft watercolor washes" in seen.user_message
        assert seen.body["temperature"] == 0
        assert answer.prompt == "a quiet harbour, as a watercolor masterpiece"
        assert answer.negative_prompt == "blurry, extra fingers"
        assert (answer.enhancer, answer.credits) == ("enhancer-1", 0)

        # No style is said as such; an answer in a code fence, with a list, is read.
        chat.script(
            ChatReply(
                content='```json\n{"prompt": "a boat, detailed", '
                '"negative_prompt": ["fog", "rain"]}\n```'
            )
        )
        fenced = await client.prompts.EnhancePrompt(
            P.EnhancePromptRequest(prompt="a boat"), metadata=md("alice")
        )
        assert chat.calls[1].style == "none"
        assert (fenced.prompt, fenced.negative_prompt) == ("a boat, detailed", "fog, rain")

        # Too long an answer is cut to the prompt limits.
        chat.script(
            ChatReply(
                content=json.dumps(
                    {"prompt": "grand vista, " * 400, "negative_prompt": "dull, " * 300}
                )
            )
        )
        long = await client.prompts.EnhancePrompt(
            P.EnhancePromptRequest(prompt="a vista"), metadata=md("alice")
        )
        assert 3000 < len(long.prompt) <= 4000 and not long.prompt.endswith(",")
        assert 500 < len(long.negative_prompt) <= 1000
        assert [r.model for r in await usage_of(client, "alice")] == ["enhancer-1"] * 3


@pytest.mark.parametrize(
    "reply",
    [
        ChatReply(status=503, message="overloaded"),
        ChatReply(status=500),
        ChatReply(status=429, headers={"Retry-After": "7"}),
        ChatReply(raw_body='{"choices": []}'),
        ChatReply(content="   "),
        ChatReply(drop=True),
    ],
    ids=["503", "500", "429", "no-choice", "empty", "dropped"],
)
async def test_a_chat_model_failure_is_img_002_unavailable(
    tmp_path: Path, database_url: str, chat: ChatFake, reply: ChatReply
) -> None:
    chat.script(reply)
    async with (
        serve_in_process(tmp_path, database_url, env=chat_env(chat)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        client = Client(ch)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.prompts.EnhancePrompt(
                P.EnhancePromptRequest(prompt="a quiet harbour"), metadata=md("alice")
            )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(failed.value) == "IMG_002"
        (record,) = await usage_of(client, "alice")
        assert (record.status, record.error_code, record.credits) == (
            U.USAGE_STATUS_FAILED,
            "IMG_002",
            0,
        )


async def test_a_wrong_chat_key_is_img_002_and_never_uses_openai_settings(
    tmp_path: Path, database_url: str, chat: ChatFake
) -> None:
    env = chat_env(chat, IMAGEGEN_ENHANCE_API_KEY="wrong", OPENAI_API_KEY="chat-key")
    async with (
        serve_in_process(tmp_path, database_url, env=env) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await Client(ch).prompts.EnhancePrompt(
                P.EnhancePromptRequest(prompt="a quiet harbour"), metadata=md("alice")
            )
        assert reason_of(failed.value) == "IMG_002"
        assert "IMAGEGEN_ENHANCE_API_KEY" in (failed.value.details() or "")
    assert chat.calls == [] and len(chat.refused) == 1

    # OPENAI_* alone configures no enhancement model: the local enhancer answers.
    openai_only = {"OPENAI_BASE_URL": chat.url, "OPENAI_API_KEY": "chat-key"}
    async with (
        serve_in_process(tmp_path, database_url, env=openai_only) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        answer = await Client(ch).prompts.EnhancePrompt(
            P.EnhancePromptRequest(prompt="a quiet harbour"), metadata=md("alice")
        )
        assert answer.enhancer == "local"
    assert chat.calls == []


async def test_a_priced_enhancement_is_charged_once_and_refused_without_credits(
    tmp_path: Path, database_url: str
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(
        '{"tiers": [{"max_pixels": 1048576, "credits": 2}], "edit_credits": 2, '
        '"enhance_credits": 3}'
    )
    plans = tmp_path / "plans.json"
    plans.write_text(
        '{"plans": {"free": {"requests_per_hour": null, "requests_per_day": null, '
        '"concurrent": null, "monthly_credits": 4}}}'
    )
    env = {"IMAGEGEN_PRICING_FILE": str(prices), "IMAGEGEN_PLANS_FILE": str(plans)}
    async with (
        serve_in_process(tmp_path, database_url, env=env) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        client = Client(ch)
        request = P.EnhancePromptRequest(prompt="a quiet harbour")
        answer = await client.prompts.EnhancePrompt(request, metadata=md("alice"))
        assert answer.credits == 3
        balance = await client.usage.GetCreditBalance(
            U.GetCreditBalanceRequest(), metadata=md("alice")
        )
        assert (balance.balance.available_credits, balance.balance.reserved_credits) == (1, 0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.prompts.EnhancePrompt(request, metadata=md("alice"))
        assert reason_of(refused.value) == "IMG_006"
        (record,) = await usage_of(client, "alice")
        assert (record.credits, record.status) == (3, U.USAGE_STATUS_SUCCEEDED)


class Blocked(ImageGenError):
    """What the fake screen raises (the moderation use case raises IMG_011)."""

    code = "IMG_011"


class BlockingScreen:
    """A PromptScreen that refuses any text holding a word, and records what it saw."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.seen: list[dict[str, str]] = []

    async def screen(self, identity: Identity, texts: Mapping[str, str]) -> None:
        self.seen.append(dict(texts))
        if any(self.word in text for text in texts.values()):
            raise Blocked("blocked by moderation (category: test)")


async def test_an_enhanced_prompt_that_moderation_blocks_is_refused(
    database_url: str, chat: ChatFake
) -> None:
    pool = await open_pool(database_url, max_size=2)
    http = httpx.AsyncClient(trust_env=False)
    try:
        screen = BlockingScreen("masterpiece")
        enhancement = PromptEnhancement(
            db=PostgresDatabase(pool),
            chat=ChatEnhancer(chat.url, chat.model, http, api_key="chat-key", timeout=5),
            phrases=builtin_phrases(),
            screen=screen,
            settings=EnhancementSettings(plans=PlanTable.default(), prices=PriceTable.default()),
        )
        alice = Identity(user_id="alice", sub_account="", plan="free")
        # The fake's answer adds "masterpiece": the prompt passes, the result does not.
        with pytest.raises(Blocked):
            await enhancement.enhance(alice, "a quiet harbour", Style.CINEMATIC)
        assert len(chat.calls) == 1
        assert screen.seen == [
            {"prompt": "a quiet harbour"},
            {
                "prompt": "a quiet harbour, as a cinematic masterpiece",
                "negative_prompt": "blurry, extra fingers",
            },
        ]
        rows = await pool.fetch("SELECT kind, status, error_code, credits FROM usage_records")
        assert [tuple(r) for r in rows] == [("prompt_enhancement", "failed", "IMG_011", 0)]

        # A prompt the screen refuses never reaches the model, and records nothing.
        with pytest.raises(Blocked):
            await enhancement.enhance(alice, "a masterpiece", None)
        assert len(chat.calls) == 1
        assert await pool.fetchval("SELECT count(*) FROM usage_records") == 1

        # The local enhancer's result is screened too.
        local = PromptEnhancement(
            db=PostgresDatabase(pool),
            chat=None,
            phrases=builtin_phrases(),
            screen=BlockingScreen("dramatic"),
            settings=EnhancementSettings(plans=PlanTable.default(), prices=PriceTable.default()),
        )
        with pytest.raises(Blocked):
            await local.enhance(alice, "a quiet harbour", Style.CINEMATIC)
        allowed = await local.enhance(alice, "a quiet harbour", Style.WATERCOLOR)
        assert allowed.enhancer == "local"
    finally:
        await http.aclose()
        await pool.close()


async def test_the_served_moderation_screens_what_an_enhancement_reads_and_writes(
    tmp_path: Path, database_url: str, chat: ChatFake
) -> None:
    # The server's own moderation (the built-in `rules` moderator and policy), not a fake
    # screen: a chat model's answer that moderation blocks is IMG_011, naming the category.
    answer = '{"prompt": "a quiet harbour, nude bathers", "negative_prompt": ""}'
    chat.script(ChatReply(content=answer))
    async with (
        serve_in_process(tmp_path, database_url, env=chat_env(chat)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        client = Client(ch)
        with pytest.raises(grpc.aio.AioRpcError) as blocked:
            await client.prompts.EnhancePrompt(
                P.EnhancePromptRequest(prompt="a quiet harbour"), metadata=md("alice")
            )
        assert blocked.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(blocked.value) == "IMG_011"
        assert "nude" not in (blocked.value.details() or "")
        # A blocked prompt given to enhance is refused before the model is asked.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.prompts.EnhancePrompt(
                P.EnhancePromptRequest(prompt="nude bathers at a harbour"), metadata=md("alice")
            )
        assert reason_of(refused.value) == "IMG_011"
        assert len(chat.calls) == 1
