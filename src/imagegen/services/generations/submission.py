"""Submitting a generation: validate, quote, submit, rerun.

A submit, top to bottom:
1. The provider: the one the request names, else the caller's stored default, else the
   deployment's; it is recorded on the job.
2. Validation of every field, and of what the provider can do (IMG_003); a callback_uri
   is vetted as the fetch guard would connect to it.
3. For an edit, a read-only precheck of the plan limits and credits (nothing is fetched
   for a request that would be refused), then the sources are fetched, checked and stored.
4. One unit of work under the user's advisory lock: a retry with the same request_id
   gets its earlier job back; otherwise the plan limits (IMG_005) and the credits
   (IMG_006) are decided by domain/limits.py and domain/credits.py, the job is inserted
   QUEUED, its price reserved, its QUEUED event appended and workers notified.
The job then waits for a worker (jobs/runner.py), which runs it through pipeline.py.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from opentelemetry import propagate, trace

from imagegen.domain.credits import check_affordable, plan_reservation
from imagegen.domain.errors import InvalidRequest, NotFound, RequestIdReused
from imagegen.domain.limits import check_request_limits
from imagegen.domain.models import (
    EditSource,
    Generation,
    GenerationSpec,
    Identity,
    Size,
    SourceRef,
)
from imagegen.domain.moderation import Purpose
from imagegen.domain.plans import PlanLimits, PlanTable
from imagegen.domain.pricing import PriceTable
from imagegen.domain.validation import (
    RequestLimits,
    check_count,
    check_negative_prompt,
    check_prompt,
    check_provider_id,
    check_request_id,
    check_seed,
    check_size,
)
from imagegen.jobs.signals import JobSignals
from imagegen.providers.base import Provider, ProviderRequest, SourceImage
from imagegen.repositories.generations import NewGeneration
from imagegen.services.generations.catalogue import ProviderCatalogue
from imagegen.services.moderation import ModerationService, spec_texts
from imagegen.services.sources import SourceResolver
from imagegen.services.unit_of_work import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmissionSettings:
    """The rules a submit is decided by: plans, prices and request limits."""

    plans: PlanTable
    prices: PriceTable
    #: largest size (in pixels) an edit's size is fitted to when the request gives none
    max_pixels: int
    #: how long a request_id is remembered
    request_id_ttl: timedelta
    limits: RequestLimits = field(default_factory=RequestLimits)


@dataclass(frozen=True)
class Quote:
    """What a request would cost, and which provider would serve it."""

    credits: int
    provider: str


class CallbackChecker(Protocol):
    """Vets a job's callback URL before the job exists (services/webhooks/delivery.py)."""

    async def check_callback(self, uri: str) -> None:
        """IMG_003 on callback_uri for a URL the service would not call."""
        ...


class SubmissionService:
    """Validates, prices and queues generation jobs."""

    def __init__(
        self,
        *,
        db: Database,
        sources: SourceResolver,
        catalogue: ProviderCatalogue,
        signals: JobSignals,
        settings: SubmissionSettings,
        tracer: trace.Tracer | None = None,
        moderation: ModerationService | None = None,
        callbacks: CallbackChecker | None = None,
    ) -> None:
        self._db = db
        #: None: texts are not moderated
        self._moderation = moderation
        #: None: a request naming a callback_uri is refused
        self._callbacks = callbacks
        self._sources = sources
        self._catalogue = catalogue
        self._signals = signals
        self._settings = settings
        self._tracer = tracer or trace.get_tracer(__name__)

    async def submit(
        self,
        identity: Identity,
        spec: GenerationSpec,
        request_id: str = "",
        *,
        source_refs: tuple[SourceRef, ...] = (),
        mask_ref: SourceRef | None = None,
        size_given: bool = True,
        moderation_purpose: Purpose | None = None,
    ) -> Generation:
        """Validate, moderate, fetch and store any sources, and queue a job; the same
        request_id returns the same job. `moderation_purpose` says where the prompt came
        from when it is not the caller's own text (a rendered template)."""
        edit = bool(source_refs) or spec.is_edit
        if not spec.provider:
            # The caller's stored choice, else the deployment's default; recorded on the job.
            chosen = await self._db.user_settings.default_provider(identity.user_id)
            spec = dataclasses.replace(spec, provider=chosen or self._catalogue.default_provider)
        with self._tracer.start_as_current_span("generation.validate"):
            self.validate(
                spec,
                request_id,
                edit=edit,
                has_mask=mask_ref is not None or spec.mask is not None,
                size_given=size_given,
            )
        if mask_ref is not None and not source_refs:
            raise InvalidRequest("a mask needs a source image to apply to", field="mask")
        if spec.callback_uri:
            if self._callbacks is None:
                raise InvalidRequest("callbacks are not enabled here", field="callback_uri")
            await self._callbacks.check_callback(spec.callback_uri)
        if self._moderation is not None:
            # After validation, before limits, credits, source fetches or any job row: a
            # blocked text costs nothing and counts against no limit (IMG_011/IMG_012).
            await self._moderation.check(
                identity,
                spec_texts(spec),
                moderation_purpose or (Purpose.EDIT if edit else Purpose.GENERATE),
            )
        limits = self._settings.plans.limits_for(identity.plan)
        stored: tuple[EditSource, ...] = ()
        if source_refs:
            # Limits and credits come before any work; fetching sources is work, so a
            # request that would be refused is refused first.
            await self._precheck(identity.user_id, request_id, limits, self._price(spec, edit=True))
            stored = await self._sources.resolve(
                identity, (*source_refs, *((mask_ref,) if mask_ref else ()))
            )
            sources, mask = (stored[:-1], stored[-1]) if mask_ref else (stored, None)
            spec = dataclasses.replace(spec, sources=sources, mask=mask)
            if not size_given:
                first = sources[0]
                spec = dataclasses.replace(
                    spec,
                    size=_fit(Size(first.width, first.height), self._settings.max_pixels),
                    size_from_source=True,
                )
        provider_id = spec.provider or self._catalogue.default_provider
        job = NewGeneration(
            id=str(uuid.uuid4()),
            user_id=identity.user_id,
            sub_account=identity.sub_account,
            request_id=request_id,
            spec=spec,
            provider=provider_id,
            credits=self._price(spec),
            extra_spec={"trace_context": _current_trace_context(), "plan": identity.plan},
        )
        try:
            generation, created = await self._create(job, limits)
        except BaseException:
            await self._sources.discard(stored)
            raise
        if not created:
            # The earlier job with this request_id has its own copies of the sources.
            await self._sources.discard(stored)
            return generation
        self._signals.job_queued()
        self._signals.job_changed(generation.id)
        log.info(
            "generation accepted",
            extra={
                "event": "generation.accepted",
                "generation_id": generation.id,
                "user_id": identity.user_id,
                "provider": provider_id,
                "size": str(spec.size),
                "count": spec.count,
                "edit": edit,
                "source": spec.source.value,
            },
        )
        return generation

    async def rerun(
        self, identity: Identity, generation_id: str, request_id: str = ""
    ) -> Generation:
        """A new job with the settings of one of the caller's jobs."""
        original = await self._db.generations.get(identity.user_id, generation_id)
        if original is None:
            raise NotFound(f"generation {generation_id!r} not found")
        return await self.submit(identity, original.spec, request_id)

    def quote(
        self,
        spec: GenerationSpec,
        *,
        edit: bool = False,
        has_mask: bool = False,
        size_given: bool = True,
    ) -> Quote:
        """Validate a request as submit would and say what it would reserve and who
        would serve it; nothing is stored."""
        provider = self.validate(spec, edit=edit, has_mask=has_mask, size_given=size_given)
        return Quote(credits=self._price(spec, edit=edit), provider=provider.id)

    def validate(
        self,
        spec: GenerationSpec,
        request_id: str = "",
        *,
        edit: bool = False,
        has_mask: bool = False,
        size_given: bool = True,
    ) -> Provider:
        """Check every field against its limit and the provider's capabilities; raises
        InvalidRequest naming the field. Returns the provider that would serve it."""
        check_prompt(spec.prompt)
        check_negative_prompt(spec.negative_prompt)
        if size_given:
            check_size(spec.size, self._settings.limits)
        check_count(spec.count)
        check_seed(spec.seed)
        check_request_id(request_id)
        check_provider_id(spec.provider)
        provider = self._catalogue.choose(spec.provider)
        provider_id = spec.provider or self._catalogue.default_provider
        caps = provider.capabilities
        if edit and not caps.edit:
            raise InvalidRequest(
                f"provider {provider_id!r} cannot edit images; choose one that can "
                "(ListProviders shows capabilities)",
                field="provider",
                metadata={"capability": "edit"},
            )
        if has_mask and not caps.mask:
            raise InvalidRequest(
                f"provider {provider_id!r} does not take an edit mask",
                field="mask",
                metadata={"capability": "mask"},
            )
        if spec.count > caps.max_count:
            raise InvalidRequest(
                f"provider {provider_id!r} makes at most {caps.max_count} images per request",
                field="count",
            )
        placeholder = SourceImage(b"", "", 0, 0)
        provider.check(
            ProviderRequest(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                style=spec.style,
                size=spec.size,
                model=spec.model,
                sources=(placeholder,) if edit else (),
                mask=placeholder if has_mask else None,
            )
        )
        return provider

    def _price(self, spec: GenerationSpec, *, edit: bool = False) -> int:
        """Credits a request reserves."""
        return self._settings.prices.generation_credits(
            spec.size, spec.count, edit=edit or spec.is_edit
        )

    async def _precheck(
        self, user_id: str, request_id: str, limits: PlanLimits, credits: int
    ) -> None:
        """The plan-limit and credit decisions of `_create`, read-only and without the
        lock: lets expensive work before a submit (fetching source URLs) be skipped for a
        request that would be refused anyway. `_create` still decides."""
        now = datetime.now(UTC)
        # One connection for the three reads; nothing is written, so nothing is committed.
        async with self._db.unit_of_work() as uow:
            if request_id and await uow.generations.request_id_taken(user_id, request_id):
                return  # a retry: `_create` answers with the job it already made
            check_request_limits(await uow.generations.request_counts(user_id), limits)
            facts = await uow.credits.facts(user_id, now)
            check_affordable(facts, credits, limits.monthly_credits, now)

    async def _create(self, job: NewGeneration, limits: PlanLimits) -> tuple[Generation, bool]:
        """Store a queued job with its QUEUED event and its credit reservation, within the
        user's plan limits; an existing job for the same request_id is returned instead
        (created=False), or IMG_009 if its parameters differ. One transaction under the
        user's advisory lock, so every replica counts the same limits and balance."""
        async with self._db.unit_of_work() as uow:
            await uow.generations.lock_user(job.user_id)
            if job.request_id:
                past = await uow.generations.find_request(
                    job.user_id, job.request_id, remembered_for=self._settings.request_id_ttl
                )
                if past is not None:
                    if past.fingerprint != job.spec.fingerprint():
                        raise RequestIdReused(
                            f"request_id {job.request_id!r} was used for a different "
                            "request; use a new request_id for new parameters",
                            metadata={"request_id": job.request_id},
                        )
                    await uow.commit()  # keeps the forgetting of expired request ids
                    return past.generation, False
            check_request_limits(await uow.generations.request_counts(job.user_id), limits)
            now = datetime.now(UTC)
            await uow.credits.ensure_allowance(job.user_id, limits.monthly_credits, now)
            generation = await uow.generations.insert(job)
            reservation = plan_reservation(
                await uow.credits.facts(job.user_id, now), job.credits, now
            )
            await uow.credits.reserve(job.user_id, job.id, reservation)
            await uow.generations.announce_queued(job.id)
            await uow.commit()
            return generation, True


def _fit(size: Size, max_pixels: int) -> Size:
    """`size`, scaled down (keeping its aspect ratio) to at most `max_pixels` pixels."""
    if size.pixels <= max_pixels:
        return size
    scale = (max_pixels / size.pixels) ** 0.5
    return Size(max(1, int(size.width * scale)), max(1, int(size.height * scale)))


def _current_trace_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
