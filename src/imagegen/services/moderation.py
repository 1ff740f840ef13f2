"""Content moderation before any cost, and the abuse signals it feeds.

`ModerationService.check(identity, texts, purpose)` is the one entry point every text
that becomes a prompt goes through (prompt and negative prompt of a generation or an
edit, a rendered template, an enhanced prompt), before limits, credits or any job row:

    suspended?  -> IMG_011 PERMISSION_DENIED with RetryInfo to the suspension's end
    the chain   -> each Moderator in order (IMAGEGEN_MODERATION_CHAIN); stops early once
                   the plan's policy would block on what it has
    the policy  -> allowed, flagged (runs, recorded for review), blocked (IMG_011 naming
                   the categories, never the matched words), or a moderator down and the
                   plan fails closed (IMG_012 with RetryInfo; fail open flags instead)
    recorded    -> every decision (hashes of the texts, categories, scores, moderators);
                   a block counts on its user, and N blocks in the plan's window suspend

A provider's own verdict on a job (OpenAI's content-policy refusal, IMG_010) is recorded
as a blocked decision with purpose `provider_output` by `generation_failed`, which the
pipeline calls for every failed job (it also counts the user's failed generations).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from imagegen.domain.errors import (
    ContentBlocked,
    ContentPolicyRefused,
    ImageGenError,
    ModerationUnavailable,
)
from imagegen.domain.models import Generation, GenerationSpec, Identity
from imagegen.domain.moderation import (
    Assessment,
    Decision,
    ModerationPolicy,
    ModerationPolicyTable,
    Purpose,
    Verdict,
    assess,
    suspension_end,
    suspension_remaining,
    text_sha256,
)
from imagegen.repositories.moderation import DecisionRecord, ModerationRepository

log = logging.getLogger(__name__)

#: The window of the per-user block count exported for alerts (one user far above the
#: others), whatever each plan's suspension window is.
ALERT_WINDOW = timedelta(hours=1)


class Moderator(Protocol):
    """One moderation backend (the port): scores texts in our categories."""

    #: the name the chain setting uses ("rules", "openai")
    id: str

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """One verdict per text, in order; raises ModerationUnavailable when it cannot
        answer (down, timed out, refused us)."""
        ...


class ModerationObserver(Protocol):
    """Where moderation reports for metrics: never a text, never a user id as a label."""

    def decision_made(self, decision: str, purpose: str, categories: Sequence[str]) -> None: ...

    def moderator_unavailable(self, moderator: str) -> None: ...

    def user_blocks(self, user_id: str, blocks_in_window: int, at: datetime) -> None: ...


def spec_texts(spec: GenerationSpec) -> dict[str, str]:
    """The texts of a generation or edit that become a prompt, by field."""
    return {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt}


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ModerationService:
    """Checks texts against the moderator chain and the caller's plan policy, records
    every decision, and suspends users who are blocked too often."""

    def __init__(
        self,
        *,
        chain: Sequence[Moderator],
        policies: ModerationPolicyTable,
        repository: ModerationRepository,
        observer: ModerationObserver | None = None,
        store_text: bool = False,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._chain = tuple(chain)
        self._policies = policies
        self._repository = repository
        self._observer = observer
        self._store_text = store_text
        self._clock = clock

    @property
    def chain(self) -> tuple[str, ...]:
        """The moderators' ids, in the order they are asked."""
        return tuple(m.id for m in self._chain)

    async def check(
        self, identity: Identity, texts: Mapping[str, str], purpose: Purpose
    ) -> Assessment:
        """Judge the texts that are about to become a prompt (empty ones are skipped).
        Returns the assessment when the request may go on (allowed or flagged); raises
        ContentBlocked (IMG_011, also while the caller is suspended) or
        ModerationUnavailable (IMG_012). Every decision is recorded before it returns."""
        now = self._clock()
        await self._refuse_if_suspended(identity, purpose, now)
        fields = {name: text for name, text in texts.items() if text and text.strip()}
        if not fields or not self._chain:
            return Assessment(Decision.ALLOWED)
        policy = self._policies.for_plan(identity.plan)
        assessment, answered, retry_after = await self._run_chain(policy, fields)
        if assessment.decision is Decision.UNAVAILABLE:
            self._observe(Decision.UNAVAILABLE, purpose, ())
            wait = retry_after or policy.unavailable_retry_after
            raise ModerationUnavailable(
                "content moderation is unavailable right now, so the request was not "
                f"accepted; try again in {wait.total_seconds():.0f}s",
                retry_after=wait,
                metadata={"moderators": ",".join(assessment.unavailable)},
            )
        record = DecisionRecord(
            id=str(uuid.uuid4()),
            user_id=identity.user_id,
            sub_account=identity.sub_account,
            plan=identity.plan,
            purpose=purpose,
            decision=assessment.decision,
            categories=tuple(c.value for c in assessment.categories),
            scores={c.value: round(s, 6) for c, s in assessment.scores.items()},
            moderators=",".join(answered),
            unavailable=assessment.unavailable,
            text_sha256={name: text_sha256(text) for name, text in fields.items()},
            texts=dict(fields)
            if self._store_text and assessment.decision is not Decision.ALLOWED
            else None,
            generation_id=None,
            created_at=now,
        )
        suspended_until = await self._store(record, policy)
        if assessment.decision is Decision.BLOCKED:
            categories = record.categories
            listed = ", ".join(categories)
            if suspended_until is not None:
                raise self._suspended_error(suspended_until, now, categories)
            raise ContentBlocked(
                f"the request was blocked by content moderation ({listed}); change the "
                "prompt and try again",
                categories=categories,
                metadata={"fields": ",".join(assessment.fields)},
            )
        return assessment

    async def generation_failed(self, job: Generation, error: ImageGenError) -> None:
        """Count a failed job on its user; a provider's content-policy refusal is also
        recorded as a blocked decision on the job's texts (and counts toward a
        suspension). Never raises: the job's failure is already recorded."""
        try:
            now = self._clock()
            await self._repository.generation_failed(job.user_id, now)
            if isinstance(error, ContentPolicyRefused):
                await self._record_provider_verdict(job, now)
        except Exception:
            log.exception(
                "could not record a failed generation for moderation",
                extra={"event": "moderation.record_failed", "generation_id": job.id},
            )

    async def _record_provider_verdict(self, job: Generation, now: datetime) -> None:
        fields = {n: t for n, t in spec_texts(job.spec).items() if t}
        record = DecisionRecord(
            id=str(uuid.uuid4()),
            user_id=job.user_id,
            sub_account=job.sub_account,
            plan=job.plan,
            purpose=Purpose.PROVIDER_OUTPUT,
            decision=Decision.BLOCKED,
            categories=(),
            scores={},
            moderators=f"provider:{job.provider}",
            unavailable=(),
            text_sha256={name: text_sha256(text) for name, text in fields.items()},
            texts=dict(fields) if self._store_text else None,
            generation_id=job.id,
            created_at=now,
        )
        await self._store(record, self._policies.for_plan(job.plan))

    async def _store(self, record: DecisionRecord, policy: ModerationPolicy) -> datetime | None:
        """Record the decision and, for a block, apply the suspension rule; returns the
        suspension's end when this block started (or extended) one."""
        rule = policy.suspension
        windows = (rule.window if rule else ALERT_WINDOW, ALERT_WINDOW)
        in_rule_window, in_alert_window = await self._repository.record(record, windows=windows)
        self._observe(record.decision, record.purpose, record.categories)
        log.info(
            "moderation decision",
            extra={
                "event": "moderation.decision",
                "decision_id": record.id,
                "decision": record.decision.value,
                "purpose": record.purpose.value,
                "categories": ",".join(record.categories),
                "moderators": record.moderators,
                "user_id": record.user_id,
            },
        )
        if record.decision is not Decision.BLOCKED:
            return None
        if self._observer is not None:
            self._observer.user_blocks(record.user_id, in_alert_window, record.created_at)
        until = suspension_end(rule, in_rule_window, record.created_at)
        if until is None:
            return None
        until = await self._repository.suspend(record.user_id, until)
        log.warning(
            "user suspended after repeated blocks",
            extra={
                "event": "moderation.suspended",
                "user_id": record.user_id,
                "blocks": in_rule_window,
                "suspended_until": until.isoformat(),
            },
        )
        return until

    async def _refuse_if_suspended(
        self, identity: Identity, purpose: Purpose, now: datetime
    ) -> None:
        until = await self._repository.suspended_until(identity.user_id)
        if suspension_remaining(until, now) is None:
            return
        assert until is not None
        self._observe("suspended", purpose, ())
        raise self._suspended_error(until, now, ())

    @staticmethod
    def _suspended_error(
        until: datetime, now: datetime, categories: tuple[str, ...]
    ) -> ContentBlocked:
        remaining = suspension_remaining(until, now) or timedelta(0)
        stamp = until.astimezone(UTC).isoformat(timespec="seconds")
        return ContentBlocked(
            f"you are suspended from generating until {stamp} after repeated requests "
            "blocked by content moderation; try again then",
            categories=categories,
            retry_after=remaining,
            metadata={"suspended_until": stamp},
        )

    async def _run_chain(
        self, policy: ModerationPolicy, fields: Mapping[str, str]
    ) -> tuple[Assessment, tuple[str, ...], timedelta | None]:
        """Ask each moderator in turn; stop once the policy would block on what the
        chain found so far. Returns the assessment, the moderators that answered and
        the longest Retry-After an unavailable one gave."""
        names = list(fields)
        texts = [fields[name] for name in names]
        found: dict[str, list[Verdict]] = {name: [] for name in names}
        answered: list[str] = []
        unavailable: list[str] = []
        retry_after: timedelta | None = None
        for moderator in self._chain:
            try:
                verdicts = await moderator.moderate(texts)
            except ModerationUnavailable as exc:
                unavailable.append(moderator.id)
                if exc.retry_after is not None:
                    retry_after = max(retry_after or exc.retry_after, exc.retry_after)
                if self._observer is not None:
                    self._observer.moderator_unavailable(moderator.id)
                log.warning(
                    "moderator unavailable: %s",
                    exc.message,
                    extra={"event": "moderation.unavailable", "moderator": moderator.id},
                )
                continue
            answered.append(moderator.id)
            for name, verdict in zip(names, verdicts, strict=True):
                found[name].append(verdict)
            merged = {name: Verdict.merge(v) for name, v in found.items()}
            if assess(policy, merged).decision is Decision.BLOCKED:
                break
        merged = {name: Verdict.merge(v) for name, v in found.items()}
        return assess(policy, merged, unavailable=tuple(unavailable)), tuple(answered), retry_after

    def _observe(self, decision: str, purpose: str, categories: Sequence[str]) -> None:
        if self._observer is not None:
            self._observer.decision_made(str(decision), str(purpose), categories)


class EnhancementScreen:
    """The moderation use case as prompt enhancement's screen (services/prompts): the
    prompt it reads and the prompt it writes are checked like any prompt, for the
    purpose `enhance`, so a blocked enhancement is IMG_011 and is recorded."""

    def __init__(self, moderation: ModerationService) -> None:
        self._moderation = moderation

    async def screen(self, identity: Identity, texts: Mapping[str, str]) -> None:
        """Return when the texts may be used; raise IMG_011 or IMG_012 otherwise."""
        await self._moderation.check(identity, texts, Purpose.ENHANCE)
