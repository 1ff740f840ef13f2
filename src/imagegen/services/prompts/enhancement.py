"""EnhancePrompt: a richer prompt and a proposed negative prompt, from the deployment's
chat model when one is configured (IMAGEGEN_ENHANCE_URL), else from the deterministic
local enhancer (domain/enhancement.py).

An enhancement, top to bottom:
1. The prompt is checked (IMG_003); when enhancements cost credits, a read-only check
   that the caller can pay (IMG_006) comes before any work.
2. The prompt is screened (PromptScreen: content moderation) before it goes to a model.
3. The chat model rewrites it (IMG_002 UNAVAILABLE when it fails), or the local
   enhancer does; the result is cut to the prompt limits (4000 / 1000 characters).
4. The result is screened; a refused one is not returned.
5. One unit of work: the price is charged under the user's advisory lock (when it is
   not 0) and a usage record of kind PROMPT_ENHANCEMENT is written with its source.
   A failed step 3 or 4 leaves a failed usage record (no charge); a refusal at step 1
   or 2 changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from imagegen.domain.credits import check_affordable, open_period, plan_reservation
from imagegen.domain.enhancement import (
    ENHANCER_PROVIDER,
    LOCAL_ENHANCER,
    EnhancedText,
    enhance_locally,
    fit_to_limits,
)
from imagegen.domain.errors import ImageGenError, ProviderFailed
from imagegen.domain.models import GenerationSource, Identity, Style
from imagegen.domain.phrases import PhraseBook, StylePhrases
from imagegen.domain.plans import PlanTable
from imagegen.domain.pricing import PriceTable
from imagegen.domain.usage import UsageKind, UsageRecord
from imagegen.domain.validation import check_prompt
from imagegen.services.unit_of_work import Database

log = logging.getLogger(__name__)


class PromptScreen(Protocol):
    """Content moderation of the texts an enhancement reads and writes (the port).

    The moderation use case implements it (its check of texts for the purpose
    "enhance"); until a deployment wires one, `AllowAllScreen` lets everything through."""

    async def screen(self, identity: Identity, texts: Mapping[str, str]) -> None:
        """Return when the texts (by field: `prompt`, `negative_prompt`) may be used;
        raise the refusal otherwise (IMG_011 blocked, IMG_012 moderation unavailable)."""
        ...


class AllowAllScreen:
    """A PromptScreen that lets every text through: for deployments without moderation."""

    async def screen(self, identity: Identity, texts: Mapping[str, str]) -> None:
        """Allow."""
        return None


class ChatModel(Protocol):
    """An outside chat model that rewrites prompts (the port; providers/chat_enhancer.py)."""

    @property
    def name(self) -> str:
        """The model's name, reported as the enhancer."""
        ...

    async def rewrite(
        self, prompt: str, style: Style | None, phrases: StylePhrases
    ) -> EnhancedText:
        """The model's richer prompt and negative prompt for `prompt` in `style` (with the
        style's phrases as hints), not yet cut to the limits; raises ProviderFailed
        (IMG_002) when the model fails or answers nothing usable."""
        ...


@dataclass(frozen=True)
class EnhancementSettings:
    """What an enhancement is priced and limited by."""

    plans: PlanTable
    prices: PriceTable


@dataclass(frozen=True)
class Enhancement:
    """What EnhancePrompt answers."""

    prompt: str
    negative_prompt: str
    #: `local`, or the chat model's name
    enhancer: str
    credits: int


def _utc_now() -> datetime:
    return datetime.now(UTC)


class PromptEnhancement:
    """Enhances prompts, charges for them and records their usage."""

    def __init__(
        self,
        *,
        db: Database,
        chat: ChatModel | None,
        phrases: PhraseBook,
        screen: PromptScreen,
        settings: EnhancementSettings,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._db = db
        self._chat = chat
        self._phrases = phrases
        self._screen = screen
        self._settings = settings
        self._clock = clock

    @property
    def enhancer(self) -> str:
        """What serves enhancements here: `local`, or the chat model's name."""
        return self._chat.name if self._chat is not None else LOCAL_ENHANCER

    async def enhance(
        self,
        identity: Identity,
        prompt: str,
        style: Style | None,
        source: GenerationSource = GenerationSource.API,
    ) -> Enhancement:
        """A richer prompt and a negative prompt for `prompt` (see the module docstring)."""
        check_prompt(prompt)
        requested_at = self._clock()
        credits = self._settings.prices.enhance_credits
        allowance = self._settings.plans.limits_for(identity.plan).monthly_credits
        if credits:
            # Read-only, as submit's precheck: the period as opening it would make it.
            opening = open_period(
                await self._db.credits.facts(identity.user_id), allowance, requested_at
            )
            check_affordable(opening.after, credits, requested_at)
        await self._screen.screen(identity, {"prompt": prompt})
        try:
            result = await self._produce(prompt, style)
            await self._screen.screen(
                identity, {"prompt": result.prompt, "negative_prompt": result.negative_prompt}
            )
        except ImageGenError as exc:
            await self._record_failure(identity, source, requested_at, exc)
            raise
        record = self._usage(identity, source, requested_at, status="succeeded", credits=credits)
        async with self._db.unit_of_work() as uow:
            if credits:
                now = self._clock()
                await uow.generations.lock_user(identity.user_id)
                facts = await uow.credits.open_period(identity.user_id, allowance, now)
                reservation = plan_reservation(facts, credits, now)
                await uow.credits.spend(identity.user_id, reservation, note="prompt enhancement")
            await uow.usage.insert(record)
            await uow.commit()
        log.info(
            "prompt enhanced",
            extra={
                "event": "prompt.enhanced",
                "user_id": identity.user_id,
                "enhancer": self.enhancer,
                "credits": credits,
                "source": source.value,
            },
        )
        return Enhancement(result.prompt, result.negative_prompt, self.enhancer, credits)

    async def _produce(self, prompt: str, style: Style | None) -> EnhancedText:
        if self._chat is None:
            return enhance_locally(prompt, style, self._phrases)
        answer = await self._chat.rewrite(prompt, style, self._phrases.for_style(style))
        result = fit_to_limits(answer.prompt, answer.negative_prompt)
        if not result.prompt:
            raise ProviderFailed(
                f"the prompt enhancement model {self._chat.name!r} answered no prompt; try again",
                retryable=True,
            )
        return result

    def _usage(
        self,
        identity: Identity,
        source: GenerationSource,
        requested_at: datetime,
        *,
        status: str,
        credits: int = 0,
        error: ImageGenError | None = None,
    ) -> UsageRecord:
        return UsageRecord(
            user_id=identity.user_id,
            generation_id="",
            attempt=1,
            provider=ENHANCER_PROVIDER,
            model=self.enhancer,
            source=source.value,
            status=status,
            image_count=0,
            credits=credits,
            requested_at=requested_at,
            error_code=error.code if error else "",
            error_message=error.message if error else "",
            kind=UsageKind.PROMPT_ENHANCEMENT,
        )

    async def _record_failure(
        self,
        identity: Identity,
        source: GenerationSource,
        requested_at: datetime,
        error: ImageGenError,
    ) -> None:
        """A failed usage record; a failure to write it is logged, never raised over the
        error the caller is about to get."""
        record = self._usage(identity, source, requested_at, status="failed", error=error)
        try:
            async with self._db.unit_of_work() as uow:
                await uow.usage.insert(record)
                await uow.commit()
        except self._db.failures:
            log.exception(
                "recording a failed prompt enhancement failed",
                extra={"event": "prompt.enhance_record_failed", "user_id": identity.user_id},
            )
