"""The pipeline a worker runs for one claimed job (jobs/runner.py claims it and holds
its lease), from STARTED to the terminal event.

1. STARTED (appended by the claim itself). Images an earlier attempt already stored
   are skipped (never made or charged twice); the sources of an edit are read from the
   blob store.
2. For each image of the batch: the provider call, with PROGRESS events (and previews)
   as it works, abandoned as soon as the owner cancels; on a failure another provider
   may not share, the next one of the fallback chain takes over.
   Before each call, a user already at their storage quota ends the job IMG_008
   (a read-only check: no provider call is made for an image that cannot be kept).
3. The reply's bytes are checked, fitted to the job's size by the one fit rule (see
   `_stored_size`) and converted to the asked format, in a thread.
4. The image is marked as made with AI (XMP fields and a signed C2PA manifest, in a
   thread; an edit names its sources as ingredients) and the marked blob is put. Then
   one unit of work locks the user's storage counter, decides the quota
   (domain/limits.py) and records the image row and its IMAGE_READY event, so two jobs
   of one user never pass the quota together; if the quota refuses it or the record
   fails, the blob is deleted again. Its PROGRESS "stored" event is recorded with it.
5. The end, in one unit of work: the job's terminal state with its terminal event
   (COMPLETED, FAILED with its IMG code, or CANCELLED), the settlement of its credit
   reservation (images delivered are charged, the rest refunded), its usage record and
   its webhook, if it named one.

Every event is appended to the job's log and, once committed, handed to this process's
watchers in memory (jobs/signals.py); other replicas' watchers hear of it by NOTIFY.
A cancel arrives on the job's CancelFlag (its own NOTIFY channel), so the steps check
it without a round trip. PROGRESS events are written in batches: each waits up to
PROGRESS_WINDOW, a newer percent replaces a waiting one (previews are all kept), and
those still waiting when the provider returns join the image's statement (no gap in
sequence numbers; IMAGE_READY and the terminal events are never dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from opentelemetry import propagate, trace

from imagegen import imaging
from imagegen.domain.enlarge import OutpaintGeometry, outpaint_geometry
from imagegen.domain.errors import (
    Cancelled,
    ImageGenError,
    ImageTooLarge,
    InvalidRequest,
    NotFound,
    ProviderFailed,
    ProviderNotConfigured,
    StorageFailed,
)
from imagegen.domain.limits import check_storage_quota, check_storage_room
from imagegen.domain.models import (
    EditSource,
    EventType,
    Generation,
    GenerationState,
    ImageFormat,
    Size,
    StoredImage,
)
from imagegen.domain.plans import PlanTable
from imagegen.domain.pricing import PriceTable
from imagegen.domain.usage import UsageRecord
from imagegen.jobs.signals import CancelFlag, JobSignals
from imagegen.provenance import (
    Ingredient,
    Origin,
    ProvenanceError,
    ProvenanceFacts,
    ProvenanceMarker,
)
from imagegen.providers.base import (
    ProgressCallback,
    Provider,
    ProviderImage,
    ProviderRequest,
    SourceImage,
)
from imagegen.repositories.generations import ClaimedJob, NewEvent
from imagegen.services.generations.catalogue import ProviderCatalogue
from imagegen.services.moderation import ModerationService
from imagegen.services.unit_of_work import Database
from imagegen.services.webhooks.outbox import queue_job_webhook
from imagegen.storage.base import BlobStore
from imagegen.storage.keys import blob_key

log = logging.getLogger(__name__)

#: Seconds a PROGRESS event waits before it is appended, so that the events of a chatty
#: provider (and the last one before an image is stored) share a statement.
PROGRESS_WINDOW = 0.1


class GenerationObserver(Protocol):
    """Where the pipeline reports outcomes for metrics."""

    def job_started(self, provider: str) -> None: ...

    def job_finished(self, provider: str) -> None: ...

    def record_outcome(self, provider: str, outcome: str, code: str, duration_s: float) -> None: ...

    def credits_charged(self, provider: str, credits: int) -> None: ...


@dataclass(frozen=True)
class PipelineSettings:
    """The rules and limits a job runs within."""

    plans: PlanTable
    prices: PriceTable
    #: largest image (width x height) decoded from a provider's reply
    max_pixels: int
    #: time the provider calls of one attempt may take together
    provider_timeout: timedelta
    #: times a job is started before it is failed
    max_attempts: int
    #: the deployment's usage notice written into every stored image (IMAGEGEN_USAGE_NOTICE)
    usage_notice: str
    #: how images that must be re-encoded are encoded
    encode: imaging.EncodeSettings = field(default_factory=imaging.EncodeSettings)


class JobPipeline:
    """Runs claimed jobs to their terminal state."""

    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        catalogue: ProviderCatalogue,
        signals: JobSignals,
        observer: GenerationObserver,
        settings: PipelineSettings,
        marker: ProvenanceMarker,
        tracer: trace.Tracer | None = None,
        moderation: ModerationService | None = None,
    ) -> None:
        self._db = db
        self._blobs = blobs
        #: writes the provenance marks into every image before it is stored
        self._marker = marker
        #: told of failed jobs (abuse signals, provider content-policy verdicts); None: off
        self._moderation = moderation
        self._catalogue = catalogue
        self._signals = signals
        self._observer = observer
        self._settings = settings
        self._tracer = tracer or trace.get_tracer(__name__)
        #: jobs this process is executing right now
        self._executing: set[str] = set()

    def runs_here(self, generation_id: str) -> bool:
        """Whether this process is executing the job right now."""
        return generation_id in self._executing

    async def execute(self, claimed: ClaimedJob, worker_id: str, cancel: CancelFlag) -> None:
        """Run one claimed job to its terminal state. Shutdown cancellation propagates
        (the runner hands the job back); every other failure ends the job FAILED."""
        job = claimed.generation
        self._executing.add(job.id)
        try:
            await self._execute(_Run(claimed, cancel, self._event_writer(job.id)), worker_id)
        finally:
            self._executing.discard(job.id)

    def _event_writer(self, generation_id: str) -> _EventWriter:
        return _EventWriter(generation_id, self._db, self._signals)

    async def _execute(self, run: _Run, worker_id: str) -> None:
        """The job's span, its outcome (which terminal state), and its metrics."""
        job = run.job
        started = time.monotonic()
        requested_at = job.created_at
        provider = self._catalogue.get(job.provider)
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
                    try:
                        model, job = await self._make_images(job, provider, run)
                    finally:
                        # No PROGRESS event may follow the terminal one.
                        await run.events.close()
                except Cancelled:
                    outcome, code = "cancelled", ""
                    await self._finish(
                        job, worker_id, requested_at, GenerationState.CANCELLED, model=job.model
                    )
                except ImageGenError as exc:
                    outcome, code = "failed", exc.code
                    span.set_attribute("imagegen.outcome", outcome)
                    span.set_attribute("imagegen.error_code", exc.code)
                    await self._finish(
                        job,
                        worker_id,
                        requested_at,
                        GenerationState.FAILED,
                        model=job.model,
                        error=exc,
                    )
                else:
                    outcome = "completed"
                    span.set_attribute("imagegen.outcome", outcome)
                    await self._finish(
                        job, worker_id, requested_at, GenerationState.COMPLETED, model=model
                    )
        except Exception:
            log.exception("generation %s failed unexpectedly", job.id)
            outcome, code = "failed", ProviderFailed.code
            await self._finish(
                job,
                worker_id,
                requested_at,
                GenerationState.FAILED,
                model=job.model,
                error=ProviderFailed("the generation failed unexpectedly; try again"),
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

    # --- making the images ----------------------------------------------------------------

    async def _make_images(
        self, job: Generation, provider: Provider, run: _Run
    ) -> tuple[str, Generation]:
        """Make and store every image; returns the model and the job as served (its
        provider changes when a fallback took over)."""
        existing = run.claimed.stored_indexes
        model = job.model
        count = job.spec.count
        progress = _BatchProgress(count, run.events)
        base_seed = job.spec.seed if job.spec.seed is not None else _seed_from(job.id)
        deadline = time.monotonic() + self._settings.provider_timeout.total_seconds()
        sources = tuple([await self._load_source(s) for s in job.spec.sources])
        mask = await self._load_source(job.spec.mask, "mask") if job.spec.mask else None
        outpaint = self._outpaint_geometry(job)
        quota = self._settings.plans.limits_for(job.plan).storage_bytes
        for index in range(count):
            if index in existing:
                # Stored by an earlier attempt of this job: never make or charge it twice.
                continue
            await self._checkpoint(job.id, run.cancel)
            if quota is not None:
                check_storage_room(quota, await self._db.images.storage_used(job.user_id))
            request = ProviderRequest(
                prompt=job.spec.prompt,
                negative_prompt=job.spec.negative_prompt,
                style=job.spec.style,
                size=job.spec.size,
                seed=(base_seed + index) % 2**32,
                model=job.spec.model,
                output_format=job.spec.output_format,
                sources=sources,
                mask=mask,
                resize_to=None if job.spec.size_from_source else job.spec.size,
                # The reply is fitted to spec.size, which submit set to the outpaint's
                # canvas or the upscaled size: openai answers at its native sizes.
                outpaint=outpaint,
                upscale=job.spec.upscale,
                timeout=max(deadline - time.monotonic(), 0.1),
            )
            call_started = time.monotonic()
            reply, serving = await self._call_with_fallback(
                job, provider, request, progress.reporter(index), run.cancel
            )
            # The provider's last PROGRESS events wait for the image's statement: stored
            # moments later, it makes them stale anyway.
            last_progress = await run.events.take()
            if serving is not provider:
                provider = serving
                job = dataclasses.replace(job, provider=serving.id, model="")
                await self._db.generations.set_provider(job.id, serving.id)
            model = reply.model or model or (provider.models[0] if provider.models else "")
            await self._checkpoint(job.id, run.cancel)
            with self._tracer.start_as_current_span(
                "image.process",
                attributes={
                    "imagegen.image.input.size": len(reply.data),
                    "imagegen.image.requested_format": job.spec.output_format.value,
                },
            ) as process_span:
                encoded, info = await asyncio.to_thread(
                    self._process_reply,
                    reply.data,
                    job.spec.output_format,
                    _stored_size(job, provider),
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
                # A seed the provider has no way to take was not the one it made it with.
                used_seed=request.seed if provider.capabilities.seed else None,
                call_started=call_started,
                waiting_progress=last_progress,
                stored_progress=progress.stored(index),
                sources=sources,
                received=reply.data,
            )
        return model, job

    async def _call_with_fallback(
        self,
        job: Generation,
        primary: Provider,
        request: ProviderRequest,
        on_progress: ProgressCallback,
        cancel: CancelFlag,
    ) -> tuple[ProviderImage, Provider]:
        """Call the primary provider; on a failure that another provider may not share
        (unavailable, breaker open, not configured), move down the fallback chain."""
        order = self._catalogue.call_order(job.spec, primary)
        for position, provider in enumerate(order):
            try:
                with self._tracer.start_as_current_span(
                    "generation.provider_call", attributes={"imagegen.provider": provider.id}
                ):
                    reply = await self._call_provider(
                        job.id, provider, request, on_progress, cancel
                    )
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

    async def _call_provider(
        self,
        generation_id: str,
        provider: Provider,
        request: ProviderRequest,
        on_progress: ProgressCallback,
        cancel: CancelFlag,
    ) -> ProviderImage:
        """The provider call, abandoned as soon as the job's owner cancels it (this
        replica's cancel, or another's through its NOTIFY; no polling)."""
        call = asyncio.create_task(provider.generate(request, on_progress))
        try:
            while True:
                woken = asyncio.create_task(cancel.changed.wait())
                try:
                    done, _ = await asyncio.wait(
                        {call, woken}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    # Also when a drain cancels the job here: a waiter left pending
                    # is destroyed pending ("Task was destroyed but it is pending!").
                    woken.cancel()
                if call in done:
                    return call.result()
                cancel.changed.clear()
                await self._checkpoint(generation_id, cancel)
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call

    def _process_reply(
        self, data: bytes, output_format: ImageFormat, size: Size | None
    ) -> tuple[bytes, imaging.ImageInfo]:
        """The image to store for the provider's bytes, in the asked format and size
        (None: the reply's): stored as it came when it already matches, else decoded,
        fitted and encoded once. Runs in a worker thread."""
        try:
            prepared = imaging.prepare_output(
                data,
                target_format=output_format,
                target_size=size,
                limits=imaging.ImageLimits(max_pixels=self._settings.max_pixels),
                encode_settings=self._settings.encode,
            )
        except ImageTooLarge as exc:
            raise ProviderFailed(
                f"the provider returned an image over the pixel limit: {exc.message}"
            ) from exc
        except imaging.ImageDecodeError as exc:
            raise ProviderFailed(
                f"the provider returned bytes that are not a whole PNG, JPEG or WebP image ({exc})"
            ) from exc
        return prepared.data, prepared.info

    # --- storing an image -----------------------------------------------------------------

    async def _store(
        self,
        job: Generation,
        index: int,
        encoded: bytes,
        info: imaging.ImageInfo,
        *,
        model: str,
        reported_seed: int | None,
        used_seed: int | None,
        call_started: float,
        waiting_progress: list[NewEvent],
        stored_progress: NewEvent,
        sources: tuple[SourceImage, ...],
        received: bytes,
    ) -> None:
        """Marks, blob, then quota, row and events (the progress still waiting, IMAGE_READY
        and `stored_progress`) in one unit of work; no blob stays without its row, and no
        row without its blob. `call_started` is when the image's provider call began
        (time.monotonic()); `sources` are the edit's loaded sources (its parents, named in
        the marks); `received` is the provider's reply as it came (a manifest of the
        provider's own in it is kept in the marks' chain)."""
        image_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        key = blob_key(job.user_id, image_id, info.format.extension, now)
        facts = self._provenance_facts(job, image_id, model, now, sources, received)
        with self._tracer.start_as_current_span(
            "image.mark", attributes={"imagegen.image.format": info.format.value}
        ):
            try:
                encoded = await asyncio.to_thread(self._marker.mark, encoded, info.format, facts)
            except (ProvenanceError, ValueError) as exc:
                log.exception(
                    "marking an image failed",
                    extra={
                        "event": "provenance.failed",
                        "generation_id": job.id,
                        "error": str(exc),
                    },
                )
                raise StorageFailed(
                    "the image was made but marking it as AI-made failed; submit the request again"
                ) from exc
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
            created_at=now,
            index=index,
            is_edit=job.spec.is_edit,
            parent_ids=tuple(s.image_id for s in job.spec.sources if s.image_id),
            sub_account=job.sub_account,
            credits=self._image_price(job),
            generation_duration=timedelta(seconds=time.monotonic() - call_started),
        )
        try:
            recorded = await self._record_image(
                image,
                waiting_progress,
                NewEvent(EventType.IMAGE_READY, {"image_id": image_id, "image_index": index}),
                stored_progress,
                quota=self._settings.plans.limits_for(job.plan).storage_bytes,
                negative_prompt=job.spec.negative_prompt,
                style=job.spec.style.value if job.spec.style else "",
                seed=reported_seed if reported_seed is not None else used_seed,
            )
        except BaseException:
            # No blob without its row: undo the upload, whatever stopped the insert
            # (the quota included).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._blobs.delete(key))
            raise
        if recorded is None:
            # An earlier attempt of this job stored this image first; keep only that one.
            await self._blobs.delete(key)

    def _provenance_facts(
        self,
        job: Generation,
        image_id: str,
        model: str,
        created: datetime,
        sources: tuple[SourceImage, ...],
        received: bytes,
    ) -> ProvenanceFacts:
        """What the marks of image `image_id` say: a generation, or an edit (outpaints and
        upscales included) whose sources are its parents, in source order."""
        parents = tuple(
            Ingredient(
                data=source.data,
                title=f"images/{spec_source.image_id}"
                if spec_source.image_id
                else f"source {position + 1}",
            )
            for position, (spec_source, source) in enumerate(
                zip(job.spec.sources, sources, strict=False)
            )
        )
        return ProvenanceFacts(
            origin=Origin.EDITED if parents else Origin.GENERATED,
            provider_id=job.provider,
            model=model,
            created=created,
            usage_notice=self._settings.usage_notice,
            title=f"images/{image_id}",
            parents=parents,
            provider_output=received,
        )

    async def _record_image(
        self,
        image: StoredImage,
        waiting: list[NewEvent],
        event: NewEvent,
        progress: NewEvent,
        *,
        quota: int | None,
        negative_prompt: str,
        style: str,
        seed: int | None,
    ) -> StoredImage | None:
        """Decide the storage quota, insert the row of a stored blob and announce it (after
        the PROGRESS events `waiting`, its IMAGE_READY event, then `progress`),
        atomically: the user's storage counter stays locked from the decision to the
        commit, so concurrent jobs of one user decide one after the other. None when
        another attempt of the job already stored this batch index. Raises
        StorageQuotaExceeded (IMG_008) past `quota` (None: no quota), StorageFailed when
        the database cannot record it."""
        try:
            async with self._db.unit_of_work() as uow:
                if quota is not None:
                    used = await uow.images.lock_storage_used(image.user_id)
                    check_storage_quota(quota, used, image.size_bytes)
                stored = await uow.images.insert(
                    image, negative_prompt=negative_prompt, style=style, seed=seed
                )
                if stored is None:
                    return None
                appended = await uow.generations.append_events(
                    image.generation_id, (*waiting, event, progress)
                )
                await uow.commit()
        except self._db.failures as exc:
            # Committed or not, this process's watchers read the log to find out.
            self._signals.job_changed(image.generation_id)
            raise StorageFailed(
                "the image was made but recording it failed; submit the request again"
            ) from exc
        # The watchers here get the image with its event, without reading it back.
        self._signals.job_events(
            image.generation_id,
            [
                dataclasses.replace(e, image=stored) if e.type is EventType.IMAGE_READY else e
                for e in appended
            ],
        )
        return stored

    # --- the end of a job -----------------------------------------------------------------

    async def _finish(
        self,
        job: Generation,
        worker_id: str,
        requested_at: datetime,
        state: GenerationState,
        *,
        model: str,
        error: ImageGenError | None = None,
    ) -> None:
        """End a job exactly once, in one unit of work: its terminal state and event, the
        settlement of its reservation, its usage record and its webhook. Nothing changes
        when the job had already ended or another worker holds it."""
        try:
            async with self._db.unit_of_work() as uow:
                # Images stored are delivered and charged, even in a failed or cancelled
                # batch; the rest of the reservation is refunded.
                ended = await uow.generations.finish(
                    job.id,
                    state=state,
                    model=model,
                    credits_per_image=self._image_price(job),
                    terminal=_terminal_event(state, error),
                    error_code=error.code if error else "",
                    error_message=error.message if error else "",
                    worker_id=worker_id,
                )
                if ended is not None:
                    await uow.credits.settle(
                        job.user_id,
                        job.id,
                        ended.credits,
                        allowance=self._settings.plans.limits_for(job.plan).monthly_credits,
                        now=datetime.now(UTC),
                    )
                    await uow.usage.insert(
                        self._usage(
                            job,
                            _USAGE_STATUS[state],
                            model=model,
                            image_count=ended.image_count,
                            credits=ended.credits,
                            requested_at=requested_at,
                            error=error,
                        )
                    )
                    await queue_job_webhook(uow, job, state)
                    await uow.commit()
        except BaseException:
            # Committed or not, this process's watchers read the log to find out.
            self._signals.job_changed(job.id)
            raise
        if ended is None:
            # Another worker holds it or it had ended: whatever its log says, watchers read.
            self._signals.job_changed(job.id)
            return
        self._signals.job_events(job.id, (ended.event,))
        if ended.held_jobs_queued:
            # The claim gate may have held the owner's batch jobs for this one.
            self._signals.job_queued()
        if state is GenerationState.COMPLETED:
            self._observer.credits_charged(job.provider, ended.credits)
        if error is not None and self._moderation is not None:
            # Abuse signals: the user's failed generations, and a provider's own
            # content-policy refusal (IMG_010) as a moderation decision.
            await self._moderation.generation_failed(job, error)

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
            cost_cents=self._settings.prices.cost_cents(job.provider, image_count),
        )

    # --- small steps ----------------------------------------------------------------------

    def _image_price(self, job: Generation) -> int:
        return self._settings.prices.image_price(job.spec)

    def _outpaint_geometry(self, job: Generation) -> OutpaintGeometry | None:
        """Where an outpaint's source lands on its canvas, from the source's stored size
        (as submit computed it); None for any other job."""
        if job.spec.outpaint is None:
            return None
        first = job.spec.sources[0]
        return outpaint_geometry(
            Size(first.width, first.height),
            job.spec.outpaint,
            max_pixels=self._settings.max_pixels,
        )

    async def _load_source(self, source: EditSource, field: str = "sources") -> SourceImage:
        """A source's bytes; IMG_003 naming the source (never its storage key) when it
        was purged after the job was submitted."""
        try:
            data = await self._blobs.get(source.storage_key)
        except NotFound:
            name = f"images/{source.image_id}" if source.image_id else "a source image"
            raise InvalidRequest(
                f"{name} of this edit was purged before the job ran; submit the edit again "
                "with a source that exists",
                field=field,
            ) from None
        return SourceImage(data, source.mime_type, source.width, source.height)

    async def _checkpoint(self, generation_id: str, cancel: CancelFlag) -> None:
        """Cancelled if the owner asked for it; called between the steps of a job. The
        flag answers without a round trip, unless a lost listener connection may have
        hidden a cancel: then the database does, once."""
        if cancel.uncertain and not cancel.requested:
            cancel.uncertain = False
            if await self._db.generations.is_cancel_requested(generation_id):
                cancel.request()
        if cancel.requested:
            raise Cancelled("the generation was cancelled")


@dataclass
class _Run:
    """One execution of a claimed job: what the claim said, its cancel flag and the
    writer of its events."""

    claimed: ClaimedJob
    cancel: CancelFlag
    events: _EventWriter

    @property
    def job(self) -> Generation:
        return self.claimed.generation


class _EventWriter:
    """Appends a running job's PROGRESS events in order, few statements for many events.

    A PROGRESS event waits up to PROGRESS_WINDOW before it is appended, and while one
    append is in flight the next ones wait: meanwhile a newer percent replaces a waiting
    percent-only event (events with a preview are kept, each). Whatever waits when the
    provider call returns goes into the statement of the image it made (`take`);
    whatever waits at the end is dropped (no PROGRESS after the terminal event). Every
    append is handed to this process's watchers once committed."""

    def __init__(self, generation_id: str, db: Database, signals: JobSignals) -> None:
        self._generation_id = generation_id
        self._db = db
        self._signals = signals
        self._pending: list[NewEvent] = []
        self._writer: asyncio.Task[None] | None = None
        #: the writer is waiting out the window (and may be stopped without loss)
        self._waiting = False
        #: `take` waits for the append in flight: the writer stops after it
        self._stopping = False
        #: how many PROGRESS events were replaced by a newer one
        self.coalesced = 0

    async def progress(self, event: NewEvent) -> None:
        """Queue a PROGRESS event; returns at once."""
        if self._pending and self._pending[-1].preview is None:
            self._pending[-1] = event
            self.coalesced += 1
        else:
            self._pending.append(event)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(
                self._write(), name=f"imagegen-progress-{self._generation_id}"
            )

    async def take(self) -> list[NewEvent]:
        """Stop writing and return what waits, to be appended with the next event (the
        append in flight, if any, finishes first: the log stays in order)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            if self._waiting:
                writer.cancel()
            self._stopping = True
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            finally:
                self._stopping = False
        pending, self._pending = self._pending, []
        return pending

    async def close(self) -> None:
        """Drop what waits and let the append in flight finish (the job is ending)."""
        with contextlib.suppress(Exception):
            await self.take()

    async def _write(self) -> None:
        while self._pending and not self._stopping:
            self._waiting = True
            try:
                await asyncio.sleep(PROGRESS_WINDOW)
            finally:
                self._waiting = False
            events, self._pending = self._pending, []
            try:
                appended = await self._db.generations.append_events(self._generation_id, events)
            except Exception:
                # Progress is advice: a lost one is not worth failing the job for.
                log.warning("appending progress of %s failed", self._generation_id, exc_info=True)
                self._signals.job_changed(self._generation_id)
                continue
            self._signals.job_events(self._generation_id, appended)


class _BatchProgress:
    """A job's overall percent across its batch: each image owns an equal share of 0-99;
    the provider's own percent fills nine tenths of that share and storing the image
    completes it. It never falls, and only COMPLETED says 100."""

    def __init__(self, count: int, events: _EventWriter) -> None:
        self._count = count
        self._events = events
        self.percent = 0

    def reporter(self, index: int) -> ProgressCallback:
        """The progress callback a provider gets while it makes image `index`."""
        share_start = index * 100 // self._count
        share_width = 100 // self._count

        async def on_progress(percent: int, stage: str, preview: bytes | None) -> None:
            overall = min(99, share_start + (max(0, min(percent, 100)) * share_width * 9) // 1000)
            if overall <= self.percent and not preview:
                return
            self.percent = max(self.percent, overall)
            payload: dict[str, object] = {
                "percent": self.percent,
                "stage": stage,
                "image_index": index,
            }
            if preview:
                payload["preview_mime_type"] = imaging.sniff_mime(preview)
            await self._events.progress(NewEvent(EventType.PROGRESS, payload, preview or None))

        return on_progress

    def stored(self, index: int) -> NewEvent:
        """Image `index` is stored: its share is complete. The PROGRESS event to append
        with its IMAGE_READY."""
        self.percent = max(self.percent, min(99, (index + 1) * 100 // self._count))
        return NewEvent(
            EventType.PROGRESS,
            {"percent": self.percent, "stage": "stored", "image_index": index},
        )


#: The usage record's status for each terminal state.
_USAGE_STATUS = {
    GenerationState.COMPLETED: "succeeded",
    GenerationState.FAILED: "failed",
    GenerationState.CANCELLED: "cancelled",
}


def _terminal_event(state: GenerationState, error: ImageGenError | None) -> NewEvent:
    """COMPLETED, FAILED with its IMG code, or CANCELLED (the log adds the image count)."""
    if state is GenerationState.COMPLETED:
        return NewEvent(EventType.COMPLETED, {"percent": 100})
    if state is GenerationState.FAILED:
        assert error is not None, "a FAILED job has an error"
        return NewEvent(
            EventType.FAILED,
            {
                "error_code": error.code,
                "error_message": error.message,
                "retryable": error.retryable,
            },
        )
    return NewEvent(EventType.CANCELLED, {})


def _stored_size(job: Generation, provider: Provider) -> Size | None:
    """The size a reply is fitted to: the job's, which is what it is priced at (asked,
    or taken from the source of an edit asked without one); None keeps the reply's,
    for an edit without a size whose instruction decides it (edit_sets_size)."""
    if job.spec.size_from_source and provider.capabilities.edit_sets_size:
        return None
    return job.spec.size


def _seed_from(generation_id: str) -> int:
    """A random-looking but stable seed for jobs that asked for none, so a retried
    attempt makes the same images."""
    return uuid.UUID(generation_id).int % 2**32
