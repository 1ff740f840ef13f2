"""The generation use cases: submit, run (the pipeline a worker executes), watch, get.

Pipeline of one job: STARTED -> for each image: provider call (PROGRESS events with
previews) -> check the reply's bytes in a thread -> convert to the asked format in
a thread -> put the blob -> image row + IMAGE_READY event in one transaction (the
blob is deleted again if that fails) -> COMPLETED with its usage record; or FAILED
with its IMG code and usage record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from opentelemetry import propagate, trace

from imagegen import imaging
from imagegen.domain import paging
from imagegen.domain.errors import (
    Cancelled,
    ImageGenError,
    ImageTooLarge,
    InvalidRequest,
    NotFound,
    ProviderFailed,
    ProviderNotConfigured,
    ShuttingDown,
    StorageQuotaExceeded,
)
from imagegen.domain.models import (
    EditSource,
    EventType,
    Generation,
    GenerationEvent,
    GenerationSpec,
    GenerationState,
    Identity,
    ImageFormat,
    Size,
    SourceRef,
    StoredImage,
)
from imagegen.domain.plans import PlanTable
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
from imagegen.providers.base import (
    ProgressCallback,
    Provider,
    ProviderImage,
    ProviderRequest,
    SourceImage,
)
from imagegen.repositories.generations import (
    GenerationQueries,
    GenerationRepository,
    JobStore,
    NewEvent,
    NewGeneration,
)
from imagegen.repositories.images import ImageRepository
from imagegen.repositories.usage import UsageRecord
from imagegen.repositories.user_settings import UserSettingsRepository
from imagegen.services.sources import SourceResolver
from imagegen.storage.base import BlobStore
from imagegen.storage.keys import blob_key

log = logging.getLogger(__name__)


class GenerationObserver(Protocol):
    """Where the pipeline reports outcomes for metrics."""

    def job_started(self, provider: str) -> None: ...

    def job_finished(self, provider: str) -> None: ...

    def record_outcome(self, provider: str, outcome: str, code: str, duration_s: float) -> None: ...

    def credits_charged(self, provider: str, credits: int) -> None: ...


@dataclass(frozen=True)
class PipelineSettings:
    """The limits and timings the pipeline works within."""

    max_pixels: int
    url_ttl: timedelta
    provider_timeout: timedelta
    request_id_ttl: timedelta
    max_attempts: int
    default_provider: str
    fallback_providers: tuple[str, ...] = ()
    watch_poll_interval: float = 1.0


class GenerationService:
    """Submits, runs and reports generation jobs."""

    def __init__(
        self,
        *,
        generations: GenerationRepository,
        queries: GenerationQueries,
        images: ImageRepository,
        job_store: JobStore,
        blobs: BlobStore,
        sources: SourceResolver,
        user_settings: UserSettingsRepository,
        plans: PlanTable | None = None,
        providers: Mapping[str, Provider],
        prices: PriceTable,
        signals: JobSignals,
        observer: GenerationObserver,
        settings: PipelineSettings,
        limits: RequestLimits | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._generations = generations
        self._queries = queries
        self._images = images
        self._jobs = job_store
        self._blobs = blobs
        self._sources = sources
        self._user_settings = user_settings
        self._plans = plans or PlanTable.default()
        self._providers = providers
        self._prices = prices
        self._signals = signals
        self._observer = observer
        self._settings = settings
        self._limits = limits or RequestLimits()
        self._tracer = tracer or trace.get_tracer(__name__)
        #: jobs this process is executing right now
        self._executing: set[str] = set()
        self._draining = False

    def begin_drain(self) -> None:
        """This replica is shutting down: watchers of jobs it is not running are told
        to go elsewhere (ShuttingDown, UNAVAILABLE); the others follow their job to its end
        or until it is handed back to the queue."""
        self._draining = True
        self._signals.wake_all()

    # --- submit ---------------------------------------------------------------------------

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
            check_size(spec.size, self._limits)
        check_count(spec.count)
        check_seed(spec.seed)
        check_request_id(request_id)
        check_provider_id(spec.provider)
        provider_id = spec.provider or self._settings.default_provider
        provider = self._providers.get(provider_id)
        if provider is None:
            known = ", ".join(sorted(self._providers))
            raise InvalidRequest(
                f"provider {provider_id!r} is not available here; use one of {known}",
                field="provider",
            )
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
                sources=(placeholder,) if edit else (),
                mask=placeholder if has_mask else None,
            )
        )
        return provider

    def quote(self, spec: GenerationSpec, *, edit: bool = False) -> int:
        """Credits a request would reserve."""
        return self._prices.generation_credits(spec.size, spec.count, edit=edit or spec.is_edit)

    async def submit(
        self,
        identity: Identity,
        spec: GenerationSpec,
        request_id: str = "",
        *,
        source_refs: tuple[SourceRef, ...] = (),
        mask_ref: SourceRef | None = None,
        size_given: bool = True,
    ) -> Generation:
        """Validate, fetch and store any sources, and queue a job; the same request_id
        returns the same job."""
        edit = bool(source_refs) or spec.is_edit
        if not spec.provider:
            # The caller's stored choice, else the deployment's default; recorded on the job.
            chosen = await self._user_settings.default_provider(identity.user_id)
            spec = dataclasses.replace(spec, provider=chosen or self._settings.default_provider)
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
        stored: tuple[EditSource, ...] = ()
        if source_refs:
            # DESIGN's order puts limits and credits before any work; fetching sources is
            # work, so a request that would be refused is refused first.
            await self._generations.precheck(
                identity.user_id,
                request_id,
                self._plans.limits_for(identity.plan),
                self.quote(spec, edit=True),
                datetime.now(UTC),
            )
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
        provider_id = spec.provider or self._settings.default_provider
        job = NewGeneration(
            id=str(uuid.uuid4()),
            user_id=identity.user_id,
            sub_account=identity.sub_account,
            request_id=request_id,
            spec=spec,
            provider=provider_id,
            credits=self.quote(spec),
            extra_spec={"trace_context": _current_trace_context(), "plan": identity.plan},
        )
        try:
            generation, created = await self._generations.create(
                job,
                request_id_ttl=self._settings.request_id_ttl,
                limits=self._plans.limits_for(identity.plan),
            )
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

    # --- settings -------------------------------------------------------------------------

    async def default_provider(self, identity: Identity) -> str:
        """The caller's stored default provider ("" for the deployment's)."""
        return await self._user_settings.default_provider(identity.user_id)

    async def set_default_provider(self, identity: Identity, provider: str) -> str:
        """Store the caller's default provider; it must be configured here ("" clears it)."""
        if provider and not _is_configured(self._providers.get(provider)):
            available = ", ".join(
                sorted(p for p, v in self._providers.items() if _is_configured(v))
            )
            raise InvalidRequest(
                f"provider {provider!r} is not available here; use one of {available}",
                field="default_provider",
            )
        return await self._user_settings.set_default_provider(identity.user_id, provider)

    # --- read -----------------------------------------------------------------------------

    async def get(self, identity: Identity, generation_id: str) -> Generation:
        """The caller's job with its images (fresh URLs); NotFound for anyone else's."""
        generation = await self._generations.get(identity.user_id, generation_id)
        if generation is None:
            raise NotFound(f"generation {generation_id!r} not found")
        images = await self._images.for_generation(generation.id)
        with_urls = tuple([await self._with_url(img) for img in images])
        return dataclasses.replace(generation, images=with_urls)

    async def list_generations(
        self,
        identity: Identity,
        *,
        states: tuple[GenerationState, ...] = (),
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Generation], str]:
        """A page of the caller's jobs, newest first, and the next page's token."""
        size = paging.page_size(page_size)
        if created_from and created_before and created_from >= created_before:
            raise InvalidRequest(
                "create_time_start must be before create_time_end", field="create_time_start"
            )
        scope = "|".join(
            [",".join(sorted(s.value for s in states)), str(created_from), str(created_before)]
        )
        cursor = paging.decode_cursor(page_token, scope)
        page = await self._queries.list_for_user(
            identity.user_id,
            states=states,
            created_from=created_from,
            created_before=created_before,
            after=cursor,
            limit=size + 1,
        )
        next_token = ""
        if len(page) > size:
            page = page[:size]
            last = page[-1]
            next_token = paging.encode_cursor(paging.Cursor(last.created_at, last.id), scope)
        return page, next_token

    async def cancel(self, identity: Identity, generation_id: str) -> Generation:
        """Cancel the caller's job: a queued one at once, a running one at its next
        checkpoint (its provider call is abandoned). A finished job is returned as is."""
        generation = await self._queries.cancel(identity.user_id, generation_id)
        if generation is None:
            raise NotFound(f"generation {generation_id!r} not found")
        self._signals.job_changed(generation.id)
        self._signals.cancel_requested(generation.id)
        return generation

    async def rerun(
        self, identity: Identity, generation_id: str, request_id: str = ""
    ) -> Generation:
        """A new job with the settings of one of the caller's jobs."""
        original = await self._generations.get(identity.user_id, generation_id)
        if original is None:
            raise NotFound(f"generation {generation_id!r} not found")
        return await self.submit(identity, original.spec, request_id)

    async def watch(
        self, identity: Identity, generation_id: str, after_sequence: int = 0
    ) -> AsyncIterator[GenerationEvent]:
        """Stored events after `after_sequence`, then live ones, until the terminal one."""
        generation = await self._generations.get(identity.user_id, generation_id)
        if generation is None:
            raise NotFound(f"generation {generation_id!r} not found")
        last = max(after_sequence, 0)
        while True:
            with self._signals.watch_job(generation.id) as changed:
                events = await self._generations.events_after(generation.id, last)
                for event in events:
                    last = event.sequence
                    yield await self._decorate(event)
                    if event.type.terminal:
                        return
                if self._draining and generation.id not in self._executing:
                    # The job may have ended here while the events above were being
                    # sent: its last events are stored before it leaves `_executing`.
                    if await self._generations.events_after(generation.id, last):
                        continue
                    raise ShuttingDown(
                        "this replica is shutting down; watch again with after_sequence="
                        f"{last} and another replica will follow the job",
                        metadata={"after_sequence": str(last)},
                    )
                if not events:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            changed.wait(), timeout=self._settings.watch_poll_interval
                        )

    async def _decorate(self, event: GenerationEvent) -> GenerationEvent:
        if event.type is not EventType.IMAGE_READY:
            return event
        image = await self._images.get_by_id(event.extra.get("image_id", ""))
        if image is None:
            return event
        return dataclasses.replace(event, image=await self._with_url(image))

    async def _with_url(self, image: StoredImage) -> StoredImage:
        url = await self._blobs.signed_url(image.storage_key, self._settings.url_ttl)
        return dataclasses.replace(image, url=url)

    # --- run (worker side) ----------------------------------------------------------------

    async def execute(self, job: Generation, worker_id: str) -> None:
        """Run one claimed job to its terminal state. Shutdown cancellation propagates
        (the runner hands the job back); every other failure ends the job FAILED."""
        self._executing.add(job.id)
        try:
            await self._execute(job, worker_id)
        finally:
            self._executing.discard(job.id)
            self._signals.job_changed(job.id)

    async def _execute(self, job: Generation, worker_id: str) -> None:
        started = time.monotonic()
        requested_at = job.created_at
        provider = self._providers.get(job.provider)
        self._observer.job_started(job.provider)
        outcome, code = "failed", ""
        try:
            with self._tracer.start_as_current_span(
                "generation.run",
                context=propagate.extract(job.trace_context),
                attributes={
                    "imagegen.generation_id": job.id,
                    "imagegen.user_id": job.user_id,
                    "imagegen.provider": job.provider,
                    "imagegen.size": str(job.spec.size),
                    "imagegen.count": job.spec.count,
                    "imagegen.attempt": job.attempts,
                },
            ) as span:
                try:
                    if job.attempts > self._settings.max_attempts:
                        raise ProviderFailed(
                            f"the job was started {job.attempts - 1} times without finishing; "
                            "submit it again",
                        )
                    if provider is None:
                        raise InvalidRequest(f"provider {job.provider!r} is not configured")
                    model, job = await self._run_pipeline(job, provider)
                except Cancelled:
                    outcome, code = "cancelled", ""
                    await self._finish_cancelled(job, worker_id, requested_at)
                except ImageGenError as exc:
                    outcome, code = "failed", exc.code
                    span.set_attribute("imagegen.outcome", outcome)
                    span.set_attribute("imagegen.error_code", exc.code)
                    await self._finish_failed(job, worker_id, exc, requested_at)
                else:
                    outcome = "completed"
                    span.set_attribute("imagegen.outcome", outcome)
                    await self._finish_completed(job, worker_id, model, requested_at)
        except Exception:
            log.exception("generation %s failed unexpectedly", job.id)
            outcome, code = "failed", ProviderFailed.code
            await self._finish_failed(
                job,
                worker_id,
                ProviderFailed("the generation failed unexpectedly; try again"),
                requested_at,
            )
        finally:
            self._observer.job_finished(job.provider)
        duration = time.monotonic() - started
        self._observer.record_outcome(job.provider, outcome, code, duration)
        log.info(
            "generation finished",
            extra={
                "event": "generation.outcome",
                "generation_id": job.id,
                "user_id": job.user_id,
                "provider": job.provider,
                "outcome": outcome,
                "code": code,
                "attempt": job.attempts,
                "duration_ms": round(duration * 1000),
            },
        )

    async def _run_pipeline(self, job: Generation, provider: Provider) -> tuple[str, Generation]:
        """Make and store every image; returns the model and the job as served (its
        provider changes when a fallback took over)."""
        await self._event(job.id, NewEvent(EventType.STARTED, {"attempt": job.attempts}))
        existing = {img.index for img in await self._images.for_generation(job.id)}
        model = job.model
        last_percent = 0
        count = job.spec.count
        base_seed = job.spec.seed if job.spec.seed is not None else _seed_from(job.id)
        deadline = time.monotonic() + self._settings.provider_timeout.total_seconds()
        sources = tuple([await self._load_source(s) for s in job.spec.sources])
        mask = await self._load_source(job.spec.mask) if job.spec.mask else None
        for index in range(count):
            if index in existing:
                # Stored by an earlier attempt of this job: never make or charge it twice.
                continue
            await self._checkpoint(job.id)
            span_start = index * 100 // count
            span_width = 100 // count

            async def on_progress(
                percent: int,
                stage: str,
                preview: bytes | None,
                *,
                _start: int = span_start,
                _width: int = span_width,
                _index: int = index,
                _job_id: str = job.id,
            ) -> None:
                nonlocal last_percent
                overall = min(99, _start + (max(0, min(percent, 100)) * _width * 9) // 1000)
                if overall <= last_percent and not preview:
                    return
                last_percent = max(last_percent, overall)
                payload: dict[str, object] = {
                    "percent": last_percent,
                    "stage": stage,
                    "image_index": _index,
                }
                if preview:
                    payload["preview_mime_type"] = imaging.sniff_mime(preview)
                await self._event(_job_id, NewEvent(EventType.PROGRESS, payload, preview or None))

            request = ProviderRequest(
                prompt=job.spec.prompt,
                negative_prompt=job.spec.negative_prompt,
                style=job.spec.style,
                size=job.spec.size,
                seed=(base_seed + index) % 2**32,
                sources=sources,
                mask=mask,
                resize_to=None if job.spec.size_from_source else job.spec.size,
                timeout=max(deadline - time.monotonic(), 0.1),
            )
            reply, serving = await self._call_with_fallback(job, provider, request, on_progress)
            if serving is not provider:
                provider = serving
                job = dataclasses.replace(job, provider=serving.id, model="")
                await self._generations.set_provider(job.id, serving.id)
            model = reply.model or model or (provider.models[0] if provider.models else "")
            await self._checkpoint(job.id)
            with self._tracer.start_as_current_span(
                "image.process",
                attributes={
                    "imagegen.image.input.size": len(reply.data),
                    "imagegen.image.requested_format": job.spec.output_format.value,
                },
            ) as process_span:
                encoded, info = await asyncio.to_thread(
                    self._process_reply, reply.data, job.spec.output_format
                )
                process_span.set_attributes(
                    {
                        "imagegen.image.size": len(encoded),
                        "imagegen.image.format": info.format.value,
                        "imagegen.image.mime_type": info.mime_type,
                        "imagegen.image.width": info.width,
                        "imagegen.image.height": info.height,
                    }
                )
            await self._store(
                job,
                index,
                encoded,
                info,
                model=model,
                reported_seed=reply.seed,
                used_seed=request.seed,
            )
            last_percent = max(last_percent, min(99, (index + 1) * 100 // count))
            await self._event(
                job.id,
                NewEvent(
                    EventType.PROGRESS,
                    {"percent": last_percent, "stage": "stored", "image_index": index},
                ),
            )
        return model, job

    def _call_order(self, job: Generation, primary: Provider) -> list[Provider]:
        """The primary, then each fallback that is configured and can do this job."""
        order = [primary]
        for provider_id in self._settings.fallback_providers:
            candidate = self._providers.get(provider_id)
            if candidate is None or candidate in order or not _is_configured(candidate):
                continue
            caps = candidate.capabilities
            if job.spec.is_edit and not caps.edit:
                continue
            if job.spec.mask is not None and not caps.mask:
                continue
            if job.spec.count > caps.max_count or job.spec.output_format not in caps.formats:
                continue
            try:
                candidate.check(
                    ProviderRequest(
                        prompt=job.spec.prompt,
                        sources=(SourceImage(b"", "", 0, 0),) if job.spec.is_edit else (),
                    )
                )
            except InvalidRequest:
                continue
            order.append(candidate)
        return order

    async def _call_with_fallback(
        self,
        job: Generation,
        primary: Provider,
        request: ProviderRequest,
        on_progress: ProgressCallback,
    ) -> tuple[ProviderImage, Provider]:
        """Call the primary provider; on a failure that another provider may not share
        (unavailable, breaker open, not configured), move down the fallback chain."""
        order = self._call_order(job, primary)
        for position, provider in enumerate(order):
            try:
                with self._tracer.start_as_current_span(
                    "generation.provider_call", attributes={"imagegen.provider": provider.id}
                ):
                    reply = await self._call_provider(job.id, provider, request, on_progress)
                return reply, provider
            except (ProviderFailed, ProviderNotConfigured) as exc:
                last = position == len(order) - 1
                movable = isinstance(exc, ProviderNotConfigured) or exc.retryable
                if last or not movable:
                    raise
                log.warning(
                    "provider failed; falling back",
                    extra={
                        "event": "provider.fallback",
                        "generation_id": job.id,
                        "provider": provider.id,
                        "next": order[position + 1].id,
                        "code": exc.code,
                    },
                )
        raise AssertionError("unreachable: the call order is never empty")  # pragma: no cover

    def _process_reply(
        self, data: bytes, output_format: ImageFormat
    ) -> tuple[bytes, imaging.ImageInfo]:
        """Check the provider's bytes (type by content, pixel limit) and encode them
        in the asked format. Runs in a worker thread."""
        try:
            imaging.inspect_image(data, max_pixels=self._settings.max_pixels)
            encoded = imaging.convert_image(
                data, output_format, max_pixels=self._settings.max_pixels
            )
            info = imaging.inspect_image(encoded, max_pixels=self._settings.max_pixels)
        except ImageTooLarge as exc:
            raise ProviderFailed(
                f"the provider returned an image over the pixel limit: {exc.message}"
            ) from exc
        except imaging.ImageDecodeError as exc:
            raise ProviderFailed(
                f"the provider returned bytes that are not a PNG, JPEG or WebP image ({exc})"
            ) from exc
        return encoded, info

    async def _store(
        self,
        job: Generation,
        index: int,
        encoded: bytes,
        info: imaging.ImageInfo,
        *,
        model: str,
        reported_seed: int | None,
        used_seed: int,
    ) -> None:
        await self._check_quota(job, len(encoded))
        image_id = str(uuid.uuid4())
        key = blob_key(job.user_id, image_id, info.format.extension, datetime.now(UTC))
        with self._tracer.start_as_current_span(
            "storage.put",
            attributes={
                "imagegen.blob.size": len(encoded),
                "imagegen.blob.mime_type": info.mime_type,
                "imagegen.blob.bucket": self._blobs.bucket,
                # The folder only: the rest of the key names the user and the image.
                "imagegen.blob.key_prefix": key.split("/", 1)[0],
            },
        ):
            await self._blobs.put(key, encoded, info.mime_type)
        image = StoredImage(
            id=image_id,
            user_id=job.user_id,
            generation_id=job.id,
            storage_key=key,
            mime_type=info.mime_type,
            width=info.width,
            height=info.height,
            size_bytes=len(encoded),
            provider=job.provider,
            model=model,
            prompt=job.spec.prompt,
            created_at=datetime.now(UTC),
            index=index,
            is_edit=job.spec.is_edit,
            parent_ids=tuple(s.image_id for s in job.spec.sources if s.image_id),
        )
        try:
            recorded = await self._jobs.record_image(
                image,
                NewEvent(EventType.IMAGE_READY, {"image_id": image_id, "image_index": index}),
                negative_prompt=job.spec.negative_prompt,
                style=job.spec.style.value if job.spec.style else "",
                seed=reported_seed if reported_seed is not None else used_seed,
            )
        except BaseException:
            # No blob without its row: undo the upload, whatever stopped the insert.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._blobs.delete(key))
            raise
        if recorded is None:
            # An earlier attempt of this job stored this image first; keep only that one.
            await self._blobs.delete(key)
        self._signals.job_changed(job.id)

    async def _call_provider(
        self,
        generation_id: str,
        provider: Provider,
        request: ProviderRequest,
        on_progress: ProgressCallback,
    ) -> ProviderImage:
        """The provider call, abandoned as soon as the job's owner cancels it."""
        call = asyncio.create_task(provider.generate(request, on_progress))
        try:
            # Woken by a cancel (this replica's or another's, via NOTIFY), else polled.
            with self._signals.watch_cancel(generation_id) as changed:
                while True:
                    woken = asyncio.create_task(changed.wait())
                    try:
                        done, _ = await asyncio.wait(
                            {call, woken},
                            timeout=self._settings.watch_poll_interval,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        # Also when a drain cancels the job here: a waiter left pending
                        # is destroyed pending ("Task was destroyed but it is pending!").
                        woken.cancel()
                    if call in done:
                        return call.result()
                    changed.clear()
                    await self._checkpoint(generation_id)
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call

    async def _check_quota(self, job: Generation, size_bytes: int) -> None:
        """IMG_008 before anything is stored when the image would pass the user's quota."""
        quota = self._plans.limits_for(job.plan).storage_bytes
        if quota is None:
            return
        used = await self._images.storage_used(job.user_id)
        if used + size_bytes > quota:
            raise StorageQuotaExceeded(
                f"storing this image ({size_bytes} bytes) would pass your storage quota of "
                f"{quota} bytes ({used} used); purge images to free space",
                metadata={"quota_bytes": str(quota), "used_bytes": str(used)},
            )

    def _image_price(self, job: Generation) -> int:
        return self._prices.generation_credits(job.spec.size, 1, edit=job.spec.is_edit)

    async def _load_source(self, source: EditSource) -> SourceImage:
        data = await self._blobs.get(source.storage_key)
        return SourceImage(data, source.mime_type, source.width, source.height)

    async def _checkpoint(self, generation_id: str) -> None:
        if await self._generations.is_cancel_requested(generation_id):
            raise Cancelled("the generation was cancelled")

    async def _event(self, generation_id: str, event: NewEvent) -> GenerationEvent:
        appended = await self._generations.append_event(generation_id, event)
        self._signals.job_changed(generation_id)
        return appended

    async def _finish_completed(
        self, job: Generation, worker_id: str, model: str, requested_at: datetime
    ) -> None:
        images = await self._images.for_generation(job.id)
        credits = self._image_price(job) * len(images)
        finished = await self._jobs.finish(
            job.id,
            state=GenerationState.COMPLETED,
            model=model,
            credits=credits,
            usage=self._usage(
                job,
                "succeeded",
                model=model,
                image_count=len(images),
                credits=credits,
                requested_at=requested_at,
            ),
            event=NewEvent(EventType.COMPLETED, {"percent": 100, "images": len(images)}),
            worker_id=worker_id,
        )
        if finished is not None:
            self._observer.credits_charged(job.provider, credits)
        self._signals.job_changed(job.id)

    async def _finish_failed(
        self, job: Generation, worker_id: str, error: ImageGenError, requested_at: datetime
    ) -> None:
        images = await self._images.for_generation(job.id)
        # Images already stored in a failed batch stay delivered and are charged.
        credits = self._image_price(job) * len(images)
        await self._jobs.finish(
            job.id,
            state=GenerationState.FAILED,
            model=job.model,
            credits=credits,
            error_code=error.code,
            error_message=error.message,
            usage=self._usage(
                job,
                "failed",
                model=job.model,
                image_count=len(images),
                credits=credits,
                requested_at=requested_at,
                error=error,
            ),
            event=NewEvent(
                EventType.FAILED,
                {
                    "error_code": error.code,
                    "error_message": error.message,
                    "retryable": error.retryable,
                },
            ),
            worker_id=worker_id,
        )
        self._signals.job_changed(job.id)

    async def _finish_cancelled(
        self, job: Generation, worker_id: str, requested_at: datetime
    ) -> None:
        images = await self._images.for_generation(job.id)
        credits = self._image_price(job) * len(images)
        await self._jobs.finish(
            job.id,
            state=GenerationState.CANCELLED,
            model=job.model,
            credits=credits,
            usage=self._usage(
                job,
                "cancelled",
                model=job.model,
                image_count=len(images),
                credits=credits,
                requested_at=requested_at,
            ),
            event=NewEvent(EventType.CANCELLED, {}),
            worker_id=worker_id,
        )
        self._signals.job_changed(job.id)

    def _usage(
        self,
        job: Generation,
        status: str,
        *,
        model: str,
        image_count: int,
        credits: int,
        requested_at: datetime,
        error: ImageGenError | None = None,
    ) -> UsageRecord:
        return UsageRecord(
            user_id=job.user_id,
            generation_id=job.id,
            attempt=job.attempts,
            provider=job.provider,
            model=model,
            source=job.spec.source.value,
            status=status,
            image_count=image_count,
            credits=credits,
            requested_at=requested_at,
            error_code=error.code if error else "",
            error_message=error.message if error else "",
            cost_cents=self._prices.cost_cents(job.provider, image_count),
        )


def _seed_from(generation_id: str) -> int:
    """A random-looking but stable seed for jobs that asked for none, so a retried
    attempt makes the same images."""
    return uuid.UUID(generation_id).int % 2**32


def _current_trace_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def _fit(size: Size, max_pixels: int) -> Size:
    """`size`, scaled down (keeping its aspect ratio) to at most `max_pixels` pixels."""
    if size.pixels <= max_pixels:
        return size
    scale = (max_pixels / size.pixels) ** 0.5
    return Size(max(1, int(size.width * scale)), max(1, int(size.height * scale)))


def _is_configured(provider: Provider | None) -> bool:
    return provider is not None and provider.configured
