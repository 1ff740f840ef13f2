"""The moderation policy as pure functions: thresholds, actions, the negative prompt's
cap, a moderator that cannot answer, the suspension rule, and the policy file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagegen.domain.moderation import (
    Action,
    Category,
    CategoryRule,
    Decision,
    ModerationPolicy,
    ModerationPolicyTable,
    NegativePromptRule,
    SuspensionRule,
    Verdict,
    WhenUnavailable,
    assess,
    suspension_end,
    suspension_remaining,
    text_sha256,
)

POLICY = ModerationPolicy(
    categories={
        Category.SEXUAL: CategoryRule(Action.BLOCK),
        Category.VIOLENCE: CategoryRule(Action.FLAG, threshold=0.8),
        Category.HARASSMENT: CategoryRule(Action.ALLOW),
    },
    threshold=0.5,
)
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def v(**scores: float) -> Verdict:
    return Verdict({Category(k): s for k, s in scores.items()})


@pytest.mark.parametrize(
    ("scores", "decision", "categories"),
    [
        ({}, Decision.ALLOWED, ()),
        ({"sexual": 0.49}, Decision.ALLOWED, ()),
        ({"sexual": 0.5}, Decision.BLOCKED, (Category.SEXUAL,)),
        ({"violence": 0.79}, Decision.ALLOWED, ()),
        ({"violence": 0.8}, Decision.FLAGGED, (Category.VIOLENCE,)),
        ({"harassment": 1.0}, Decision.ALLOWED, ()),
        ({"hate": 0.6}, Decision.FLAGGED, (Category.HATE,)),  # left out of the policy
        ({"sexual": 0.9, "violence": 0.9}, Decision.BLOCKED, (Category.SEXUAL,)),
    ],
)
def test_threshold_and_action_per_category(
    scores: dict[str, float], decision: Decision, categories: tuple[Category, ...]
) -> None:
    got = assess(POLICY, {"prompt": v(**scores)})
    assert (got.decision, got.categories) == (decision, categories)


def test_the_negative_prompt_flags_but_never_blocks_by_default() -> None:
    got = assess(POLICY, {"prompt": v(), "negative_prompt": v(sexual=1.0)})
    assert (got.decision, got.categories) == (Decision.FLAGGED, (Category.SEXUAL,))
    strict = ModerationPolicy(POLICY.categories, negative_prompt=NegativePromptRule.CHECK)
    assert assess(strict, {"negative_prompt": v(sexual=1.0)}).decision is Decision.BLOCKED


def test_an_unavailable_moderator_fails_closed_or_open_as_the_policy_says() -> None:
    closed = assess(POLICY, {"prompt": v()}, unavailable=("openai",))
    assert closed.decision is Decision.UNAVAILABLE and closed.unavailable == ("openai",)
    open_policy = ModerationPolicy(POLICY.categories, when_unavailable=WhenUnavailable.FAIL_OPEN)
    opened = assess(open_policy, {"prompt": v()}, unavailable=("openai",))
    assert opened.decision is Decision.FLAGGED
    # A block found by a moderator that did answer still blocks.
    blocked = assess(POLICY, {"prompt": v(sexual=1.0)}, unavailable=("openai",))
    assert blocked.decision is Decision.BLOCKED


def test_suspension_after_n_blocks_and_its_end() -> None:
    rule = SuspensionRule(blocks=3, window=timedelta(hours=1), period=timedelta(hours=2))
    assert suspension_end(rule, 2, NOW) is None
    assert suspension_end(rule, 3, NOW) == NOW + timedelta(hours=2)
    assert suspension_end(None, 100, NOW) is None
    until = NOW + timedelta(minutes=5)
    assert suspension_remaining(until, NOW) == timedelta(minutes=5)
    assert suspension_remaining(until, until) is None
    assert suspension_remaining(None, NOW) is None


def test_text_hash_is_sha256_of_utf8() -> None:
    # printf 'abc' | sha256sum
    assert text_sha256("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_default_table_and_unknown_plans() -> None:
    table = ModerationPolicyTable.default()
    assert set(table.plans) == {"free", "basic", "pro", "enterprise"}
    assert table.for_plan("no-such-plan") is table.plans["free"]
    free = table.for_plan("free")
    assert free.rule_for(Category.SEXUAL_MINORS).action is Action.BLOCK
    assert free.when_unavailable is WhenUnavailable.FAIL_CLOSED
    assert free.suspension is not None and free.suspension.blocks == 5


def test_policy_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {
                "plans": {
                    "free": {
                        "threshold": 0.7,
                        "categories": {
                            "violence": "block",
                            "sexual": {"action": "flag", "threshold": 0.3},
                        },
                        "negative_prompt": "check",
                        "when_unavailable": "fail_open",
                        "unavailable_retry_seconds": 5,
                        "suspension": {"blocks": 2, "window_seconds": 60, "period_seconds": 600},
                    },
                    "pro": {"suspension": None},
                }
            }
        )
    )
    table = ModerationPolicyTable.load(path)
    free = table.for_plan("free")
    assert free.threshold == 0.7
    assert free.rule_for(Category.VIOLENCE) == CategoryRule(Action.BLOCK)
    assert free.threshold_for(Category.SEXUAL) == 0.3
    assert free.negative_prompt is NegativePromptRule.CHECK
    assert free.when_unavailable is WhenUnavailable.FAIL_OPEN
    assert free.unavailable_retry_after == timedelta(seconds=5)
    assert free.suspension == SuspensionRule(2, timedelta(seconds=60), timedelta(seconds=600))
    assert table.for_plan("pro").suspension is None
    # What a plan's entry leaves out stays as built in; unnamed plans keep theirs.
    assert free.rule_for(Category.SEXUAL_MINORS) == CategoryRule(Action.BLOCK, threshold=0.2)
    built_in = ModerationPolicyTable.default()
    assert table.for_plan("pro").categories == built_in.for_plan("pro").categories
    assert table.for_plan("enterprise") == built_in.for_plan("enterprise")
    assert table.for_plan("no-such-plan") is free


@pytest.mark.parametrize(
    "body",
    [
        {"categories": {"weapons": "block"}},
        {"categories": {"sexual": "forbid"}},
        {"threshold": 0},
        {"threshold": 1.5},
        {"when_unavailable": "maybe"},
        {"suspension": {"blocks": 0, "window_seconds": 60, "period_seconds": 60}},
        {"suspension": {"blocks": 3}},
        {"suspension_rule": {}},
    ],
)
def test_a_bad_policy_file_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModerationPolicyTable.from_json(json.dumps({"plans": {"free": body}}))
