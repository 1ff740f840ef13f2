"""Moderation before any cost, through a real server in this process: blocked requests
(prompt, rendered template, edit instruction) end at submit with IMG_011 and leave no job,
no provider request, no credit or rate-limit trace; flagged ones run and are recorded; a
moderator that is down fails closed or open as the plan says; a provider's own refusal
is recorded; blocks suspend a user, who resumes after the period."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
)

from imagegen.domain.errors import ContentBlocked
from imagegen.domain.models import Identity
from imagegen.domain.moderation import (
    Action,
    Category,
    CategoryRule,
    ModerationPolicy,
    ModerationPolicyTable,
    Purpose,
    SuspensionRule,
)
from imagegen.domain.moderation_rules import RuleSet
from imagegen.identity import mint_token
from imagegen.providers.rules_moderation import RulesModerator
from imagegen.repositories.db import open_pool
from imagegen.repositories.moderation import ModerationRepository
from imagegen.services.moderation import ModerationService
from tests.fakes.forge_server import ForgeFake, png_bytes
from tests.fakes.openai_moderation_server import ModerationFake
from tests.fakes.openai_server import OpenAIFake, OpenAIReply
from tests.inprocess import TEST_JWT_KEY, serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS

E = generation_pb2
T = templates_pb2


def md(user: str = "alice", plan: str = "free") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user, plan=plan)}"),)


def error_details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    status = rpc_status.from_call(err)
    assert status is not None
    found: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def submit(port: int, spec: common_pb2.GenerationSpec, user: str = "alice") -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        return await stub.SubmitGeneration(
            E.SubmitGenerationRequest(spec=spec), metadata=md(user), timeout=30
        )


async def refused(port: int, spec: common_pb2.GenerationSpec, user: str = "alice") -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(port, spec, user)
    return caught.value


async def run_to_end(port: int, spec: common_pb2.GenerationSpec, user: str = "alice") -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        events = []
        try:
            async for reply in stub.GenerateImage(
                E.GenerateImageRequest(spec=spec), metadata=md(user), timeout=60
            ):
                events.append(reply.event)
        except grpc.aio.AioRpcError:
            pass
        return events


def forge(prompt: str, **kwargs: Any) -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt=prompt,
        provider="forge",
        size=common_pb2.ImageSize(width=512, height=512),
        **kwargs,
    )


#: free: one request per hour, so a blocked request that took the slot would show.
ONE_PER_HOUR = {
    "plans": {
        "free": {
            "requests_per_hour": 1,
            "requests_per_day": None,
            "concurrent": None,
            "monthly_credits": 10,
        }
    }
}


@pytest.fixture
async def forge_fake() -> AsyncIterator[ForgeFake]:
    async with ForgeFake.start() as fake:
        yield fake


def forge_env(fake: ForgeFake, tmp_path: Path, **extra: str) -> dict[str, str]:
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps(ONE_PER_HOUR))
    return {
        "BUILT_IN_FORGE_API_URL": fake.url,
        "BUILT_IN_FORGE_API_KEY": "k",
        "IMAGEGEN_PLANS_FILE": str(plans),
        **extra,
    }


async def test_a_blocked_prompt_costs_nothing_and_takes_no_slot(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    async with serve_in_process(tmp_path, database_url, env=forge_env(forge_fake, tmp_path)) as s:
        err = await refused(s.grpc_port, forge("a p0rn poster, K.I.L.L"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error_details(err)
        info = details["ErrorInfo"]
        assert info.reason == "IMG_011"
        assert info.metadata["categories"] == "sexual"  # violence only flags
        assert info.metadata["fields"] == "prompt"
        assert "RetryInfo" not in details
        assert "p0rn" not in (err.details() or "") and "porn" not in (err.details() or "")
        # No job row, no provider request, no ledger entry (balance), no rate-limit slot.
        assert await rows(database_url, "SELECT id FROM generations") == []
        assert forge_fake.requests == []
        assert await rows(database_url, "SELECT id FROM credit_ledger") == []
        accepted = await submit(s.grpc_port, forge("a lighthouse at dusk"))
        assert accepted.generation.name
    decisions = await rows(
        database_url,
        "SELECT decision, categories, purpose, moderators, text_sha256, texts "
        "FROM moderation_decisions ORDER BY created_at",
    )
    assert [(r["decision"], r["purpose"]) for r in decisions] == [
        ("blocked", "generate"),
        ("allowed", "generate"),
    ]
    blocked = decisions[0]
    assert blocked["categories"] == ["sexual"] and blocked["moderators"] == "rules"
    assert set(blocked["text_sha256"]) == {"prompt"} and blocked["texts"] is None
    [user] = await rows(database_url, "SELECT * FROM moderation_users")
    assert user["user_id"] == "alice" and user["blocked_total"] == 1


async def test_a_template_that_renders_to_a_blocked_prompt_is_blocked(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    async with (
        serve_in_process(tmp_path, database_url, env=forge_env(forge_fake, tmp_path)) as s,
        grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}", options=CHANNEL_OPTIONS) as ch,
    ):
        stub = templates_pb2_grpc.PromptTemplateServiceStub(ch)
        template = (
            await stub.CreatePromptTemplate(
                T.CreatePromptTemplateRequest(
                    template=T.PromptTemplate(
                        display_name="Poster",
                        prompt="a {{thing}} poster",
                        variables=[T.TemplateVariable(name="thing", required=True)],
                    )
                ),
                metadata=md(),
            )
        ).template
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateFromPromptTemplate(
                T.GenerateFromPromptTemplateRequest(
                    name=template.name,
                    variables={"thing": "n-u-d-e"},
                    overrides=T.GenerationOverrides(provider="forge"),
                ),
                metadata=md(),
            )
        again = await stub.GetPromptTemplate(
            T.GetPromptTemplateRequest(name=template.name), metadata=md()
        )
        assert error_details(caught.value)["ErrorInfo"].reason == "IMG_011"
        assert again.template.usage_count == 0
        assert await rows(database_url, "SELECT id FROM generations") == []
        assert forge_fake.requests == []
        # No ledger entry, and the hour's one request is still free.
        assert await rows(database_url, "SELECT id FROM credit_ledger") == []
        assert (await submit(s.grpc_port, forge("a lighthouse at dusk"))).generation.name
    decisions = await rows(
        database_url, "SELECT purpose, decision FROM moderation_decisions ORDER BY created_at"
    )
    assert [tuple(d) for d in decisions] == [("template", "blocked"), ("generate", "allowed")]


async def test_a_blocked_edit_instruction_fetches_and_stores_nothing(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    async with serve_in_process(tmp_path, database_url, env=forge_env(forge_fake, tmp_path)) as s:
        err = await refused(
            s.grpc_port,
            forge(
                "make her n\u00fcde",
                sources=[common_pb2.ImageSource(data=png_bytes(64, 64))],
            ),
        )
        assert error_details(err)["ErrorInfo"].reason == "IMG_011"
        assert await rows(database_url, "SELECT id FROM generations") == []
        assert await rows(database_url, "SELECT id FROM images") == []  # no upload kept
        assert forge_fake.requests == []
        # No ledger entry, and the hour's one request is still free.
        assert await rows(database_url, "SELECT id FROM credit_ledger") == []
        assert (await submit(s.grpc_port, forge("a lighthouse at dusk"))).generation.name
    decisions = await rows(
        database_url, "SELECT purpose, decision FROM moderation_decisions ORDER BY created_at"
    )
    assert [tuple(d) for d in decisions] == [("edit", "blocked"), ("generate", "allowed")]


async def test_flagged_requests_run_and_are_recorded_with_their_text_when_allowed(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    env = forge_env(forge_fake, tmp_path, IMAGEGEN_MODERATION_STORE_TEXT="true")
    async with serve_in_process(tmp_path, database_url, env=env) as s:
        # violence flags by default; a negative prompt can flag but never block.
        events = await run_to_end(
            s.grpc_port, forge("a knight about to kill a dragon", negative_prompt="nudity, gore")
        )
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    assert len(forge_fake.requests) == 1
    [decision] = await rows(
        database_url, "SELECT decision, categories, texts, scores FROM moderation_decisions"
    )
    assert decision["decision"] == "flagged"
    assert decision["categories"] == ["sexual", "violence"]
    assert decision["texts"] == {
        "prompt": "a knight about to kill a dragon",
        "negative_prompt": "nudity, gore",
    }
    assert decision["scores"]["violence"] == 1.0


async def test_moderator_down_fails_closed_as_img_012_with_retry_info(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    async with ModerationFake.start(status=500) as moderator:
        env = forge_env(
            forge_fake,
            tmp_path,
            IMAGEGEN_MODERATION_CHAIN="rules,openai",
            IMAGEGEN_MODERATION_URL=moderator.url,
            IMAGEGEN_MODERATION_API_KEY="mod-key",
        )
        async with serve_in_process(tmp_path, database_url, env=env) as s:
            err = await refused(s.grpc_port, forge("a lighthouse at dusk"))
            # A block the rules find needs no answer from the moderator that is down.
            blocked = await refused(s.grpc_port, forge("a porn poster"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    details = error_details(err)
    assert details["ErrorInfo"].reason == "IMG_012"
    assert details["ErrorInfo"].metadata["moderators"] == "openai"
    assert details["RetryInfo"].retry_delay.seconds == 30
    assert error_details(blocked)["ErrorInfo"].reason == "IMG_011"
    assert len(moderator.requests) == 1
    assert moderator.requests[0].headers["Authorization"] == "Bearer mod-key"
    assert await rows(database_url, "SELECT id FROM generations") == []
    assert forge_fake.requests == []
    # Nothing was judged for the refused one; the block is recorded.
    decisions = await rows(database_url, "SELECT decision FROM moderation_decisions")
    assert [d["decision"] for d in decisions] == ["blocked"]


async def test_moderator_timing_out_fails_open_and_flags_when_the_policy_says(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"plans": {"free": {"when_unavailable": "fail_open"}}}))
    async with ModerationFake.start(stalled=True) as moderator:
        env = forge_env(
            forge_fake,
            tmp_path,
            IMAGEGEN_MODERATION_CHAIN="openai",
            IMAGEGEN_MODERATION_URL=moderator.url,
            IMAGEGEN_MODERATION_TIMEOUT="0.2",
            IMAGEGEN_MODERATION_POLICY_FILE=str(policy),
        )
        async with serve_in_process(tmp_path, database_url, env=env) as s:
            events = await run_to_end(s.grpc_port, forge("a lighthouse at dusk"))
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    [decision] = await rows(
        database_url, "SELECT decision, unavailable, moderators FROM moderation_decisions"
    )
    assert tuple(decision) == ("flagged", ["openai"], "")


async def test_openai_moderator_scores_block_and_map_categories(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    keywords = {"dragon": ("hate/threatening", 0.97), "castle": ("violence", 0.3)}
    async with ModerationFake.start(keywords=keywords) as moderator:
        env = forge_env(
            forge_fake,
            tmp_path,
            IMAGEGEN_MODERATION_CHAIN="openai",
            OPENAI_BASE_URL=moderator.url,  # stands in: no moderation settings of its own
            OPENAI_API_KEY="sk-shared",
        )
        async with serve_in_process(tmp_path, database_url, env=env) as s:
            err = await refused(s.grpc_port, forge("a dragon", negative_prompt="castle"))
            allowed = await submit(s.grpc_port, forge("a castle"))
    assert error_details(err)["ErrorInfo"].metadata["categories"] == "hate"
    assert allowed.generation.name
    assert [r.body["input"] for r in moderator.requests] == [["a dragon", "castle"], ["a castle"]]
    assert moderator.requests[0].headers["Authorization"] == "Bearer sk-shared"
    [blocked, _] = await rows(
        database_url, "SELECT scores FROM moderation_decisions ORDER BY created_at"
    )
    assert blocked["scores"]["hate"] == pytest.approx(0.97)
    assert blocked["scores"]["violence"] == pytest.approx(0.3)


async def test_a_provider_refusal_is_recorded_as_a_decision(
    tmp_path: Path, database_url: str
) -> None:
    async with OpenAIFake.start() as fake:
        fake.default = OpenAIReply(status=400, error_code="moderation_blocked")
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as s:
            events = await run_to_end(
                s.grpc_port, common_pb2.GenerationSpec(prompt="a fox", provider="openai")
            )
    assert events[-1].error.code == "IMG_010"
    decisions = await rows(
        database_url,
        "SELECT purpose, decision, moderators, generation_id FROM moderation_decisions "
        "ORDER BY created_at",
    )
    assert [(d["purpose"], d["decision"]) for d in decisions] == [
        ("generate", "allowed"),
        ("provider_output", "blocked"),
    ]
    assert decisions[1]["moderators"] == "provider:openai"
    [job] = await rows(database_url, "SELECT id FROM generations")
    assert decisions[1]["generation_id"] == job["id"]
    [user] = await rows(
        database_url, "SELECT failed_generations, blocked_total FROM moderation_users"
    )
    assert tuple(user) == (1, 1)


async def test_repeated_blocks_suspend_through_grpc(
    tmp_path: Path, database_url: str, forge_fake: ForgeFake
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "plans": {
                    "free": {
                        "suspension": {
                            "blocks": 2,
                            "window_seconds": 3600,
                            "period_seconds": 7200,
                        }
                    }
                }
            }
        )
    )
    env = forge_env(forge_fake, tmp_path, IMAGEGEN_MODERATION_POLICY_FILE=str(policy))
    async with serve_in_process(tmp_path, database_url, env=env) as s:
        first = await refused(s.grpc_port, forge("a porn poster"))
        second = await refused(s.grpc_port, forge("p 0 r n"))
        harmless = await refused(s.grpc_port, forge("a lighthouse at dusk"))
        other_user = await submit(s.grpc_port, forge("a lighthouse at dusk"), user="bob")
    assert first.code() == grpc.StatusCode.INVALID_ARGUMENT
    for err in (second, harmless):
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        details = error_details(err)
        assert details["ErrorInfo"].reason == "IMG_011"
        assert "suspended_until" in details["ErrorInfo"].metadata
        delay = details["RetryInfo"].retry_delay.ToTimedelta()
        assert timedelta(hours=1, minutes=59) < delay <= timedelta(hours=2)
    assert error_details(second)["ErrorInfo"].metadata["categories"] == "sexual"
    assert other_user.generation.name
    [user] = await rows(database_url, "SELECT * FROM moderation_users WHERE user_id = 'alice'")
    assert user["suspensions"] == 1 and user["blocked_total"] == 2


# --- the service with an injectable clock ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_a_suspended_user_resumes_after_the_period(database_url: str) -> None:
    rule = SuspensionRule(blocks=3, window=timedelta(minutes=10), period=timedelta(hours=1))
    policies = ModerationPolicyTable(
        {"free": ModerationPolicy({Category.SEXUAL: CategoryRule(Action.BLOCK)}, suspension=rule)}
    )
    clock = Clock()
    pool = await open_pool(database_url, max_size=2)
    try:
        service = ModerationService(
            chain=[RulesModerator(RuleSet.load())],
            policies=policies,
            repository=ModerationRepository(pool),
            clock=clock,
        )
        alice = Identity("alice")

        async def check(prompt: str) -> ContentBlocked | None:
            try:
                await service.check(alice, {"prompt": prompt}, Purpose.GENERATE)
            except ContentBlocked as exc:
                return exc
            return None

        # Two blocks, then one outside the window: the window holds two, no suspension.
        assert (await check("porn")) is not None
        clock.now += timedelta(minutes=1)
        assert (await check("p0rn")) is not None
        clock.now += timedelta(minutes=10)
        third = await check("PORN")
        assert third is not None and not third.suspended
        assert await check("a lighthouse") is None
        # Two more within the window with the third: suspended for the period.
        clock.now += timedelta(minutes=1)
        assert (await check("p.o.r.n")) is not None
        clock.now += timedelta(minutes=1)
        fifth = await check("p o r n")
        assert fifth is not None and fifth.suspended
        assert fifth.retry_after == timedelta(hours=1)
        suspended_at = clock.now
        clock.now = suspended_at + timedelta(minutes=59, seconds=59)
        still = await check("a lighthouse")
        assert still is not None and still.retry_after == timedelta(seconds=1)
        clock.now = suspended_at + timedelta(hours=1)
        assert await check("a lighthouse") is None  # resumed
        state = await ModerationRepository(pool).user_state("alice")
        assert state is not None and state.blocked_total == 5 and state.suspensions == 1
    finally:
        await pool.close()
