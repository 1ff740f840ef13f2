"""Content moderation decisions: categories, the per-plan policy and the pure functions
that turn moderators' verdicts into a decision and blocks into a suspension (no I/O
except reading the policy file, as domain/plans.py does).

The policy is configuration (a JSON file, IMAGEGEN_MODERATION_POLICY_FILE), per plan:

    {"plans": {"free": {
        "threshold": 0.5,                  # a category counts from this score up (0..1]
        "categories": {                    # block, flag or allow
            "sexual_minors": {"action": "block", "threshold": 0.2},
            "violence": "flag", ...},
        "negative_prompt": "flag_only",    # or "check": see NegativePromptRule
        "when_unavailable": "fail_closed", # or "fail_open" (run the request, flagged)
        "unavailable_retry_seconds": 30,   # RetryInfo of IMG_012 when a moderator gave none
        "suspension": {"blocks": 5, "window_seconds": 3600, "period_seconds": 86400}
    }}}

A plan in the file changes its built-in policy in the keys it names (categories one by
one); plans the file does not name keep theirs. A caller whose plan no table names gets
the "free" policy (the strictest built-in one). A category no policy names flags.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar


class PolicyFileError(ValueError):
    """The moderation policy file is malformed; the message names the entry."""


class Category(enum.StrEnum):
    """What a text is about, in our words; every moderator maps its own onto these."""

    SEXUAL = "sexual"
    SEXUAL_MINORS = "sexual_minors"
    VIOLENCE = "violence"
    HATE = "hate"
    HARASSMENT = "harassment"
    SELF_HARM = "self_harm"
    ILLICIT = "illicit"


class Action(enum.StrEnum):
    """What the policy does with a category found in a text."""

    ALLOW = "allow"
    FLAG = "flag"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        return _ACTION_RANK[self]


_ACTION_RANK = {Action.ALLOW: 0, Action.FLAG: 1, Action.BLOCK: 2}


class Decision(enum.StrEnum):
    """The outcome for one request's texts. UNAVAILABLE is never stored: the request is
    refused with IMG_012 (fail closed) and nothing was judged."""

    ALLOWED = "allowed"
    FLAGGED = "flagged"
    BLOCKED = "blocked"
    UNAVAILABLE = "unavailable"


class Purpose(enum.StrEnum):
    """Where the checked texts come from (recorded with each decision)."""

    GENERATE = "generate"
    EDIT = "edit"
    TEMPLATE = "template"
    ENHANCE = "enhance"
    #: a provider's own safety verdict on a job (OpenAI's content-policy refusal)
    PROVIDER_OUTPUT = "provider_output"


class NegativePromptRule(enum.StrEnum):
    """How a negative prompt is judged. It lists what the image must NOT show, so the
    words moderators look for are exactly what careful users write there ("nsfw, nudity,
    gore"): by default such a text can flag a request for review but never block it."""

    FLAG_ONLY = "flag_only"
    CHECK = "check"


class WhenUnavailable(enum.StrEnum):
    """What a plan does when a moderator of the chain cannot answer."""

    FAIL_CLOSED = "fail_closed"
    FAIL_OPEN = "fail_open"


#: The text field whose findings NegativePromptRule caps.
NEGATIVE_PROMPT_FIELD = "negative_prompt"


@dataclass(frozen=True)
class Verdict:
    """One moderator's finding on one text: a score in [0, 1] per category it saw."""

    scores: Mapping[Category, float] = field(default_factory=dict)

    @staticmethod
    def merge(verdicts: list[Verdict]) -> Verdict:
        """The highest score per category over several moderators' verdicts."""
        merged: dict[Category, float] = {}
        for verdict in verdicts:
            for category, score in verdict.scores.items():
                merged[category] = max(merged.get(category, 0.0), score)
        return Verdict(merged)


@dataclass(frozen=True)
class CategoryRule:
    """The policy for one category: its action and, optionally, its own threshold."""

    action: Action
    threshold: float | None = None


@dataclass(frozen=True)
class SuspensionRule:
    """`blocks` blocked requests within `window` suspend the user for `period`."""

    blocks: int
    window: timedelta
    period: timedelta


@dataclass(frozen=True)
class ModerationPolicy:
    """One plan's moderation policy."""

    categories: Mapping[Category, CategoryRule]
    threshold: float = 0.5
    negative_prompt: NegativePromptRule = NegativePromptRule.FLAG_ONLY
    when_unavailable: WhenUnavailable = WhenUnavailable.FAIL_CLOSED
    unavailable_retry_after: timedelta = timedelta(seconds=30)
    suspension: SuspensionRule | None = None

    def rule_for(self, category: Category) -> CategoryRule:
        # A category the policy forgot is flagged for review rather than let through.
        return self.categories.get(category, CategoryRule(Action.FLAG))

    def threshold_for(self, category: Category) -> float:
        own = self.rule_for(category).threshold
        return self.threshold if own is None else own


@dataclass(frozen=True)
class Assessment:
    """The decision on a request's texts and why: the categories that decided it (the
    blocking ones when blocked, the flagging ones when flagged) and every score seen."""

    decision: Decision
    categories: tuple[Category, ...] = ()
    scores: Mapping[Category, float] = field(default_factory=dict)
    #: moderators of the chain that could not answer
    unavailable: tuple[str, ...] = ()
    #: the text fields where the deciding categories were found
    fields: tuple[str, ...] = ()


def assess(
    policy: ModerationPolicy,
    verdicts: Mapping[str, Verdict],
    *,
    unavailable: tuple[str, ...] = (),
) -> Assessment:
    """Decide on a request from each text field's (merged) verdict.

    A category counts when its score reaches its threshold; its action then applies,
    capped at FLAG for the negative prompt unless the policy checks it like a prompt.
    Any block blocks. Otherwise, when a moderator could not answer, a fail-closed policy
    answers UNAVAILABLE (the request is refused with IMG_012) and a fail-open one flags.
    """
    blocking: set[Category] = set()
    flagging: set[Category] = set()
    blocking_fields: list[str] = []
    flagging_fields: list[str] = []
    scores: dict[Category, float] = {}
    for text_field, verdict in verdicts.items():
        for category, score in verdict.scores.items():
            scores[category] = max(scores.get(category, 0.0), score)
            if score < policy.threshold_for(category):
                continue
            action = policy.rule_for(category).action
            capped = (
                text_field == NEGATIVE_PROMPT_FIELD
                and policy.negative_prompt is NegativePromptRule.FLAG_ONLY
            )
            if capped and action is Action.BLOCK:
                action = Action.FLAG
            if action is Action.BLOCK:
                blocking.add(category)
                _add_once(blocking_fields, text_field)
            elif action is Action.FLAG:
                flagging.add(category)
                _add_once(flagging_fields, text_field)
    if blocking:
        return Assessment(
            Decision.BLOCKED, _ordered(blocking), scores, unavailable, tuple(blocking_fields)
        )
    if unavailable and policy.when_unavailable is WhenUnavailable.FAIL_CLOSED:
        return Assessment(Decision.UNAVAILABLE, (), scores, unavailable)
    if flagging or unavailable:
        return Assessment(
            Decision.FLAGGED, _ordered(flagging), scores, unavailable, tuple(flagging_fields)
        )
    return Assessment(Decision.ALLOWED, (), scores, unavailable)


def _add_once(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


def _ordered(categories: set[Category]) -> tuple[Category, ...]:
    return tuple(c for c in Category if c in categories)


def suspension_end(
    rule: SuspensionRule | None, blocks_in_window: int, now: datetime
) -> datetime | None:
    """When a user who now has `blocks_in_window` blocks (this one included) within the
    rule's window is suspended until; None when the rule does not suspend them."""
    if rule is None or blocks_in_window < rule.blocks:
        return None
    return now + rule.period


def suspension_remaining(suspended_until: datetime | None, now: datetime) -> timedelta | None:
    """How long a suspension still runs; None once it has ended (the user resumes)."""
    if suspended_until is None or suspended_until <= now:
        return None
    return suspended_until - now


def text_sha256(text: str) -> str:
    """The hex SHA-256 of a text's UTF-8 bytes: what a decision stores instead of it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- the policy table -------------------------------------------------------------------


def _default_policy(
    *, violence: Action, suspension: SuspensionRule | None
) -> ModerationPolicy:
    return ModerationPolicy(
        categories={
            Category.SEXUAL_MINORS: CategoryRule(Action.BLOCK, threshold=0.2),
            Category.SEXUAL: CategoryRule(Action.BLOCK),
            Category.HATE: CategoryRule(Action.BLOCK),
            Category.VIOLENCE: CategoryRule(violence),
            Category.HARASSMENT: CategoryRule(Action.FLAG),
            Category.SELF_HARM: CategoryRule(Action.FLAG),
            Category.ILLICIT: CategoryRule(Action.FLAG),
        },
        suspension=suspension,
    )


@dataclass(frozen=True)
class ModerationPolicyTable:
    """Moderation policies by plan name."""

    plans: Mapping[str, ModerationPolicy]

    @classmethod
    def default(cls) -> ModerationPolicyTable:
        hour = timedelta(hours=1)
        return cls(
            {
                "free": _default_policy(
                    violence=Action.FLAG,
                    suspension=SuspensionRule(5, hour, timedelta(hours=24)),
                ),
                "basic": _default_policy(
                    violence=Action.FLAG, suspension=SuspensionRule(10, hour, hour)
                ),
                "pro": _default_policy(
                    violence=Action.FLAG, suspension=SuspensionRule(10, hour, hour)
                ),
                "enterprise": _default_policy(
                    violence=Action.FLAG, suspension=SuspensionRule(20, hour, hour)
                ),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ModerationPolicyTable:
        """Parse a policy file; raises ValueError naming the first bad entry.

        Each plan in the file changes the built-in policy of that plan (of "free" for a
        plan the built-in table does not have) in the keys it names; `categories` are
        changed one by one. Plans the file does not name keep their built-in policy."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("plans"), dict):
            raise PolicyFileError('a moderation policy file is {"plans": {"<plan>": {...}}}')
        built_in = cls.default()
        plans = dict(built_in.plans)
        for name, body in data["plans"].items():
            plans[str(name)] = _policy_from(str(name), body, built_in.for_plan(str(name)))
        return cls(plans)

    @classmethod
    def load(cls, path: Path | None) -> ModerationPolicyTable:
        return cls.default() if path is None else cls.from_json(path.read_text())

    def for_plan(self, plan: str) -> ModerationPolicy:
        """The plan's policy; an unknown plan gets the "free" one (else any configured)."""
        if plan in self.plans:
            return self.plans[plan]
        if "free" in self.plans:
            return self.plans["free"]
        return next(iter(self.plans.values()), ModerationPolicyTable.default().plans["free"])


_POLICY_KEYS = {
    "threshold",
    "categories",
    "negative_prompt",
    "when_unavailable",
    "unavailable_retry_seconds",
    "suspension",
}


def _policy_from(plan: str, body: Any, base: ModerationPolicy) -> ModerationPolicy:
    where = f"plan {plan!r}"
    if not isinstance(body, dict):
        raise PolicyFileError(f"{where}: expected an object")
    unknown = set(body) - _POLICY_KEYS
    if unknown:
        raise PolicyFileError(f"{where}: unknown keys {sorted(unknown)}")
    categories: dict[Category, CategoryRule] = dict(base.categories)
    for name, rule in (body.get("categories") or {}).items():
        try:
            category = Category(name)
        except ValueError:
            known = ", ".join(c.value for c in Category)
            raise PolicyFileError(
                f"{where}: unknown category {name!r} (known: {known})"
            ) from None
        if isinstance(rule, str):
            categories[category] = CategoryRule(_enum(Action, rule, f"{where} {name}"))
        elif isinstance(rule, dict):
            threshold = rule.get("threshold")
            categories[category] = CategoryRule(
                _enum(Action, rule.get("action", ""), f"{where} {name}"),
                None if threshold is None else _score(threshold, f"{where} {name} threshold"),
            )
        else:
            raise PolicyFileError(f"{where} {name}: expected an action or an object")
    suspension = base.suspension
    if "suspension" in body:
        suspension = _suspension_from(where, body["suspension"])
    retry_after = base.unavailable_retry_after
    if "unavailable_retry_seconds" in body:
        seconds = _number(body["unavailable_retry_seconds"], f"{where} unavailable_retry_seconds")
        if seconds < 0:
            raise PolicyFileError(f"{where}: unavailable_retry_seconds must not be negative")
        retry_after = timedelta(seconds=seconds)
    return ModerationPolicy(
        categories=categories,
        threshold=_score(body["threshold"], f"{where} threshold")
        if "threshold" in body
        else base.threshold,
        negative_prompt=_enum(NegativePromptRule, body["negative_prompt"], where)
        if "negative_prompt" in body
        else base.negative_prompt,
        when_unavailable=_enum(WhenUnavailable, body["when_unavailable"], where)
        if "when_unavailable" in body
        else base.when_unavailable,
        unavailable_retry_after=retry_after,
        suspension=suspension,
    )


def _suspension_from(where: str, raw: Any) -> SuspensionRule | None:
    if raw is None:
        return None
    try:
        rule = SuspensionRule(
            blocks=int(raw["blocks"]),
            window=timedelta(seconds=float(raw["window_seconds"])),
            period=timedelta(seconds=float(raw["period_seconds"])),
        )
    except (KeyError, TypeError, ValueError):
        raise PolicyFileError(
            f"{where} suspension: needs blocks, window_seconds and period_seconds (or null)"
        ) from None
    if rule.blocks < 1 or rule.window <= timedelta(0) or rule.period <= timedelta(0):
        raise PolicyFileError(f"{where} suspension: blocks, window and period must be positive")
    return rule


def _number(value: object, where: str) -> float:
    try:
        return float(str(value))
    except ValueError:
        raise PolicyFileError(f"{where}: {value!r} is not a number") from None


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum(kind: type[_E], value: object, where: str) -> _E:
    try:
        return kind(str(value))
    except ValueError:
        allowed = ", ".join(v.value for v in kind)
        raise PolicyFileError(f"{where}: {value!r} is not one of {allowed}") from None


def _score(value: object, where: str) -> float:
    try:
        score = float(str(value))
    except ValueError:
        raise PolicyFileError(f"{where}: {value!r} is not a number") from None
    if not 0.0 < score <= 1.0:
        raise PolicyFileError(f"{where}: must be above 0 and at most 1")
    return score
