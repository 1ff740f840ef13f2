"""Submitting a generation: validate, quote, submit, rerun, and upscale (a generation
whose one source is a library image and whose spec says `upscale`).

A submit, top to bottom:
1. The provider: the one the request names, else the caller's stored default, else the
   deployment's; it is recorded on the job.
2. Validation of every field, and of what the provider can do (IMG_003); a provider
   that is not configured here, with no configured fallback for the request, is IMG_001;
   a callback_uri is vetted as the fetch guard would connect to it.
3. For an edit, a read-only precheck of the plan limits, credits and storage quota
   (nothing is fetched for a request that would be refused), then the sources are
   fetched, checked and their blobs stored as the caller's uploads (services/sources.py).
   An outpaint's or upscale's output size then follows from its source's size
   (domain/enlarge.py), refused here past the limits.
4. One unit of work under the user's advisory lock: a retry with the same request_id
   gets its earlier job back; otherwise the plan limits (IMG_005), the credits (IMG_006)
   and the storage quota (IMG_008: a user already at it, or uploads that would pass it)
   are decided by domain/limits.py and domain/credits.py, the job is inserted QUEUED
   with the rows of its new uploads, its price reserved, its QUEUED event appended and
   workers notified.
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

from imagegen.domain.credits import check_affordable, open_period, plan_reservation
from imagegen.domain.enlarge import (
    UPSCALE_PROMPT,
    check_enlarge_request,
    check_outpaint,
    check_upscale,
    outpaint_geometry,
    upscale_size,
)
from imagegen.domain.errors import (
    ImageDeleted,
    InvalidRequest,
    NotFound,
    ProviderNotConfigured,
    RequestIdReused,
)
from imagegen.domain.limits import (
    check_request_limits,
    check_storage_quota,
    check_storage_room,
    counted_up_to,
)
from imagegen.domain.models import (
    DEFAULT_SIZE,
    EditSource,
    Generation,
    GenerationSource,
    GenerationSpec,
    Identity,
    ImageFormat,
    Size,
    SourceRef,
    StoredImage,
    UpscaleSpec,
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
from imagegen.providers.base import PENDING_OUTPAINT, Provider, ProviderRequest, SourceImage
from imagegen.repositories.generations import NewGeneration
from imagegen.services.generations.catalogue import ProviderCatalogue
from imagegen.services.generations.reads import GenerationPresenter
from imagegen.services.moderation import ModerationService, spec_texts
from imagegen.services.sources import ResolvedSources, SourceResolver
from imagegen.services.unit_of_work import Database

log = logging.getLogger(__name__)

IMAGES_PREFIX = "images/"
#: The fields of GenerationSpec an upscale's checks name, as UpscaleImageRequest names them.
_UPSCALE_REQUEST_FIELDS = {
    "sources": "image",
    "upscale.factor": "factor",
    "upscale.upscaler": "upscaler",
}


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
class Submitted:
    """A submit's job, and whether this submit created it (False: a retry with the same
    request_id got the job an earlier submit made)."""

    generation: Generation
    created: bool


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
        presenter: GenerationPresenter | None = None,
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
        #: adds the stored images (with fresh URLs) to a job a retry gets back
        self._presenter = presenter
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
        submitted = await self.submit_job(
            identity,
            spec,
            request_id,
            source_refs=source_refs,
            mask_ref=mask_ref,
            size_given=size_given,
            moderation_purpose=moderation_purpose,
        )
        return submitted.generation

    async def submit_job(
        self,
        identity: Identity,
        spec: GenerationSpec,
        request_id: str = "",
        *,
        source_refs: tuple[SourceRef, ...] = (),
        mask_ref: SourceRef | None = None,
        size_given: bool = True,
        rerun: bool = False,
        moderation_purpose: Purpose | None = None,
    ) -> Submitted:
        """As `submit`, and whether this call created the job (a retry with the same
        request_id did not). `rerun`: the sources are those of a stored job."""
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
                source_count=len(source_refs) or len(spec.sources),
            )
        if mask_ref is not None and not source_refs:
            raise InvalidRequest("a mask needs a source image to apply to", field="mask")
        if spec.callback_uri:
            if self._callbacks is None:
                raise InvalidRequest("callbacks are not enabled here", field="callback_uri")
            await self._callbacks.check_callback(spec.callback_uri)
        if self._moderation is not None and not _fixed_upscale_text(spec):
            # After validation, before limits, credits, source fetches or any job row: a
            # blocked text costs nothing and counts against no limit (IMG_011/IMG_012).
            await self._moderation.check(
                identity,
                spec_texts(spec),
                moderation_purpose or (Purpose.EDIT if edit else Purpose.GENERATE),
            )
        limits = self._settings.plans.limits_for(identity.plan)
        generation_id = str(uuid.uuid4())
        stored = ResolvedSources((), None, ())
        if source_refs:
            # Limits and credits come before any work; fetching sources is work, so a
            # request that would be refused is refused first.
            await self._precheck(identity.user_id, request_id, limits, self._price(spec, edit=True))
            stored = await self._sources.resolve(
                identity,
                source_refs,
                mask_ref,
                generation_id=generation_id,
                prompt=spec.prompt,
                rerun=rerun,
            )
            spec = dataclasses.replace(spec, sources=stored.sources, mask=stored.mask)
            if spec.outpaint is not None or spec.upscale is not None:
                # The output size follows from the source's: the outpaint's canvas or the
                # upscaled size, refused here when it passes the limits (IMG_003/IMG_007).
                try:
                    enlarged = self._enlarged_size(spec, stored.sources[0])
                except BaseException:
                    await self._sources.discard(stored)
                    raise
                spec = dataclasses.replace(spec, size=enlarged, size_from_source=False)
            elif not size_given:
                first = stored.sources[0]
                spec = dataclasses.replace(
                    spec,
                    size=_fit(Size(first.width, first.height), self._settings.max_pixels),
                    size_from_source=True,
                )
        provider_id = spec.provider or self._catalogue.default_provider
        job = NewGeneration(
            id=generation_id,
            user_id=identity.user_id,
            sub_account=identity.sub_account,
            request_id=request_id,
            spec=spec,
            provider=provider_id,
            credits=self._price(spec),
            extra_spec={"trace_context": current_trace_context(), "plan": identity.plan},
        )
        try:
            generation, created = await self._create(job, limits, stored.new_uploads)
        except BaseException:
            await self._sources.discard(stored)
            raise
        if not created:
            # The earlier job with this request_id has its own uploads of the sources.
            await self._sources.discard(stored)
            if self._presenter is not None:
                generation = await self._presenter.present(identity.user_id, generation)
            return Submitted(generation, created=False)
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
        return Submitted(generation, created=True)

    async def upscale(
        self,
        identity: Identity,
        image_id: str,
        *,
        factor: int,
        provider: str = "",
        upscaler: str = "",
        request_id: str = "",
        source: GenerationSource = GenerationSource.API,
        output_format: ImageFormat | None = None,
    ) -> Generation:
        """Queue a job that enlarges one of the caller's library images by `factor` (2
        or 4) with the provider's `upscaler` (empty: its default); its result is a new
        library image whose parent is the source, in `output_format` (None: the
        source's). It is a generation like any other: the same limits, credits (by the
        price table's upscale price), idempotency and events. NOT_FOUND for an image
        that is not the caller's, IMG_003 (FAILED_PRECONDITION) for a deleted one,
        IMG_003 naming `factor`, `upscaler` or `provider`, IMG_007 past the pixel limit."""
        upscale = check_upscale(UpscaleSpec(factor, upscaler), field="")
        name = IMAGES_PREFIX + image_id
        image = await self._db.images.get(identity.user_id, image_id)
        if image is None:
            raise NotFound(f"image {name!r} not found")
        if image.deleted:
            raise ImageDeleted(
                f"image {name} is deleted; undelete it before upscaling it",
                field="image",
                image=name,
            )
        spec = GenerationSpec(
            prompt=UPSCALE_PROMPT,
            provider=provider,
            source=source,
            output_format=output_format or ImageFormat.from_mime(image.mime_type),
            upscale=upscale,
        )
        try:
            submitted = await self.submit_job(
                identity,
                spec,
                request_id,
                source_refs=(SourceRef("image", image_id=image_id),),
                size_given=False,
            )
        except InvalidRequest as exc:
            renamed = _UPSCALE_REQUEST_FIELDS.get(exc.field)
            if type(exc) is not InvalidRequest or renamed is None:
                raise
            # The checks name GenerationSpec's fields; the caller filled UpscaleImage's.
            metadata = {k: v for k, v in exc.metadata.items() if k != "field"}
            raise InvalidRequest(exc.message, field=renamed, metadata=metadata) from exc
        return submitted.generation

    async def rerun(
        self, identity: Identity, generation_id: str, request_id: str = ""
    ) -> Generation:
        """A new job with the settings of one of the caller's jobs; an edit runs again on
        the same library images (IMG_003 naming one that was purged since), and a size
        the edit took from its source is taken from it again, not checked as asked."""
        original = await self._db.generations.get(identity.user_id, generation_id)
        if original is None:
            raise NotFound(f"generation {generation_id!r} not found")
        spec = original.spec
        source_refs = tuple(_ref_of(s) for s in spec.sources)
        mask_ref = _ref_of(spec.mask) if spec.mask else None
        submitted = await self.submit_job(
            identity,
            dataclasses.replace(spec, sources=(), mask=None, size_from_source=False),
            request_id,
            source_refs=source_refs,
            mask_ref=mask_ref,
            size_given=not spec.size_from_source,
            rerun=True,
        )
        return submitted.generation

    async def quote(
        self,
        identity: Identity,
        spec: GenerationSpec,
        *,
        source_refs: tuple[SourceRef, ...] = (),
        has_mask: bool = False,
        size_given: bool = True,
    ) -> Quote:
        """Validate a request as submit would and say what it would reserve and who
        would serve it; nothing is fetched or stored. An outpaint is priced at the size
        it makes from its source's size, read without fetching: a library image's, or
        the header of given bytes; a source given by an https URL is taken as 1024x1024
        (docs/plans-and-prices.md). An upscale is priced by its factor."""
        edit = bool(source_refs)
        if not spec.provider:
            chosen = await self._db.user_settings.default_provider(identity.user_id)
            spec = dataclasses.replace(spec, provider=chosen or self._catalogue.default_provider)
        provider = self.validate(
            spec,
            edit=edit,
            has_mask=has_mask,
            size_given=size_given,
            source_count=len(source_refs),
        )
        if spec.outpaint is not None or spec.upscale is not None:
            known = await self._sources.size_of(identity, source_refs[0])
            if spec.outpaint is not None and known is None:
                # Not fetched for a quote. A target is the canvas whatever the source
                # (a 1x1 source passes its checks); sides are added to the default size.
                known = Size(1, 1) if spec.outpaint.target is not None else DEFAULT_SIZE
            if known is not None:
                placeholder = EditSource("", "", "", known.width, known.height)
                spec = dataclasses.replace(spec, size=self._enlarged_size(spec, placeholder))
        return Quote(credits=self._price(spec, edit=edit), provider=provider.id)

    def validate(
        self,
        spec: GenerationSpec,
        request_id: str = "",
        *,
        edit: bool = False,
        has_mask: bool = False,
        size_given: bool = True,
        source_count: int | None = None,
    ) -> Provider:
        """Check every field against its limit and the provider's capabilities; raises
        InvalidRequest naming the field, or ProviderNotConfigured when the provider has
        no credentials here and no configured fallback can take the request. Returns the
        provider that would serve it first. `source_count` is how many sources the
        request names (by default one for an edit); an outpaint or upscale takes one,
        and its size is checked once its source's size is known."""
        check_prompt(spec.prompt)
        check_negative_prompt(spec.negative_prompt)
        enlarge = spec.outpaint is not None or spec.upscale is not None
        check_enlarge_request(
            outpaint=spec.outpaint,
            upscale=spec.upscale,
            source_count=(1 if edit else 0) if source_count is None else source_count,
            has_mask=has_mask,
        )
        if spec.outpaint is not None:
            check_outpaint(spec.outpaint, max_pixels=self._settings.max_pixels)
        if spec.upscale is not None:
            check_upscale(spec.upscale)
            if spec.count != 1:
                raise InvalidRequest("an upscale makes one image; leave count at 1", field="count")
        if size_given and not enlarge:
            # An outpaint or upscale ignores `size`: its output size follows from the source.
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
        if spec.seed is not None and not caps.seed:
            # Its API has no seed: taking one would promise a reproducibility it cannot give.
            raise InvalidRequest(
                f"provider {provider_id!r} does not take a seed; leave it unset, or choose "
                "a provider whose capabilities say seed (ListProviders shows them)",
                field="seed",
                metadata={"capability": "seed"},
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
                outpaint=PENDING_OUTPAINT if spec.outpaint is not None else None,
                upscale=spec.upscale,
            )
        )
        if (
            not provider.configured
            and not self._catalogue.call_order(spec, provider, edit=edit, has_mask=has_mask)[1:]
        ):
            raise ProviderNotConfigured(
                f"provider {provider_id!r} is not configured on this deployment and no "
                "configured fallback can take this request; choose one that ListProviders "
                "shows",
                metadata={"provider": provider_id},
            )
        return provider

    def _enlarged_size(self, spec: GenerationSpec, source: EditSource) -> Size:
        """The size an outpaint or upscale of `source` makes: the outpaint's canvas, or
        the source's size times the factor; IMG_003 or IMG_007 past the limits."""
        source_size = Size(source.width, source.height)
        max_pixels = self._settings.max_pixels
        if spec.outpaint is not None:
            return outpaint_geometry(source_size, spec.outpaint, max_pixels=max_pixels).canvas
        assert spec.upscale is not None, "only an outpaint or an upscale is enlarged"
        return upscale_size(source_size, spec.upscale, max_pixels=max_pixels)

    def _price(self, spec: GenerationSpec, *, edit: bool = False) -> int:
        """Credits a request reserves."""
        return self._settings.prices.image_price(spec, edit=edit) * spec.count

    async def _precheck(
        self, user_id: str, request_id: str, limits: PlanLimits, credits: int
    ) -> None:
        """The plan-limit, credit and storage decisions of `_create`, read-only and
        without the lock: lets expensive work before a submit (fetching source URLs) be
        skipped for a request that would be refused anyway. `_create` still decides."""
        now = datetime.now(UTC)
        # One connection for the reads; nothing is written, so nothing is committed.
        async with self._db.unit_of_work() as uow:
            if request_id and await uow.generations.request_id_taken(user_id, request_id):
                return  # a retry: `_create` answers with the job it already made
            counts = await uow.generations.request_counts(user_id, counted_up_to(limits))
            check_request_limits(counts, limits)
            facts = await uow.credits.facts(user_id)
            check_affordable(open_period(facts, limits.monthly_credits, now).after, credits, now)
            if limits.storage_bytes is not None:
                check_storage_room(limits.storage_bytes, await uow.images.storage_used(user_id))

    async def _create(
        self, job: NewGeneration, limits: PlanLimits, uploads: tuple[StoredImage, ...]
    ) -> tuple[Generation, bool]:
        """Store a queued job with the rows of its new uploads, its QUEUED event and its
        credit reservation, within the user's plan limits; an existing job for the same
        request_id is returned instead (created=False), or IMG_009 if its parameters
        differ. One transaction under the user's advisory lock, so every replica counts
        the same limits and balance."""
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
                # Request ids are the caller's, whichever RPC used one first.
                if await uow.batches.find_request(
                    job.user_id, job.request_id, remembered_for=self._settings.request_id_ttl
                ):
                    raise RequestIdReused(
                        f"request_id {job.request_id!r} was used for a batch; use a new "
                        "request_id for new parameters",
                        metadata={"request_id": job.request_id},
                    )
            counts = await uow.generations.request_counts(job.user_id, counted_up_to(limits))
            check_request_limits(counts, limits)
            now = datetime.now(UTC)
            facts = await uow.credits.open_period(job.user_id, limits.monthly_credits, now)
            reservation = plan_reservation(facts, job.credits, now)
            if limits.storage_bytes is not None:
                # A user at the quota gets no job; the exact decision for each image is
                # made when it is recorded (pipeline.py). New uploads are stored here, so
                # they are decided here, against the locked counter as images are.
                if uploads:
                    used = await uow.images.lock_storage_used(job.user_id)
                    check_storage_quota(
                        limits.storage_bytes, used, sum(u.size_bytes for u in uploads)
                    )
                else:
                    used = await uow.images.storage_used(job.user_id)
                check_storage_room(limits.storage_bytes, used)
            generation = await uow.generations.insert(job)
            for upload in uploads:
                await uow.images.insert(upload)
            await uow.credits.reserve(job.user_id, job.id, reservation)
            await uow.generations.announce_queued(job.id)
            await uow.commit()
            return generation, True


def _ref_of(source: EditSource) -> SourceRef:
    """How a rerun names a stored job's source again: as the library image it is, or by
    its blob for a source stored before sources were kept as library images."""
    if source.image_id:
        return SourceRef("image", image_id=source.image_id)
    return SourceRef("stored", storage_key=source.storage_key)


def _fixed_upscale_text(spec: GenerationSpec) -> bool:
    """An upscale whose only text is the fixed prompt UpscaleImage gives it: nothing of
    the caller's to moderate."""
    return spec.upscale is not None and spec.prompt == UPSCALE_PROMPT and not spec.negative_prompt


def _fit(size: Size, max_pixels: int) -> Size:
    """`size`, scaled down (keeping its aspect ratio) to at most `max_pixels` pixels."""
    if size.pixels <= max_pixels:
        return size
    scale = (max_pixels / size.pixels) ** 0.5
    return Size(max(1, int(size.width * scale)), max(1, int(size.height * scale)))


def current_trace_context() -> dict[str, str]:
    """The caller's trace context, to be carried in a job so its work joins the trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
