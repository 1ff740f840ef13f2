"""BatchGenerate: several generations accepted or refused together, each its own job.

A batch, top to bottom:
1. Its size (1 to IMAGEGEN_MAX_BATCH specs), then every spec validated as
   SubmitGeneration's would be (provider chosen the same way), a refusal naming the
   spec's index (domain/batches.py); the callback URL vetted; the texts of all specs
   moderated in one check (a block names the first blocked spec's index). Edits are
   refused (IMG_003 on `specs[i].sources`): a batch is prompts; SubmitGeneration takes
   edits one by one.
2. One unit of work under the user's advisory lock (the one submits take, so every
   replica decides on the same counts): a retry with the same request_id gets the same
   batch and jobs back (IMG_009 if its parameters differ, or if the id named a single
   job); otherwise every job counts toward the hourly and daily request limits (IMG_005
   unless there is room for all of them), their prices together against the credits
   (IMG_006), the storage room (IMG_008); then the batch row, every job QUEUED with its
   reservation and QUEUED event. Nothing is stored unless all of it is.
3. The concurrent-generations limit refuses no batch: each job records the plan's
   concurrency (`max_concurrent`) and workers start it only while its owner runs fewer
   jobs than that (the claim gate of migrations/0011_batches.sql), so the rest wait
   queued.
When the batch's last job ends, its unit of work queues the batch's callback
(services/webhooks/outbox.py), with every job of the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from opentelemetry import trace

from imagegen.domain.batches import about_spec, batch_fingerprint, check_batch_size
from imagegen.domain.credits import plan_reservations
from imagegen.domain.errors import ContentBlocked, InvalidRequest, RequestIdReused
from imagegen.domain.limits import check_batch_request_limits, check_storage_room, counted_up_to
from imagegen.domain.models import Generation, GenerationSpec, Identity
from imagegen.domain.moderation import Purpose
from imagegen.domain.plans import PlanLimits
from imagegen.domain.validation import check_request_id
from imagegen.jobs.signals import JobSignals
from imagegen.repositories.batches import NewBatch
from imagegen.repositories.generations import NewGeneration
from imagegen.services.generations.catalogue import ProviderCatalogue
from imagegen.services.generations.reads import GenerationPresenter
from imagegen.services.generations.submission import (
    CallbackChecker,
    SubmissionService,
    SubmissionSettings,
    current_trace_context,
)
from imagegen.services.moderation import ModerationService, spec_texts
from imagegen.services.unit_of_work import Database

log = logging.getLogger(__name__)

#: A text's field in the batch's moderation check, `specs[3].prompt`: its spec's index.
_SPEC_FIELD = re.compile(r"specs\[(\d+)\]\.")


@dataclass(frozen=True)
class BatchItem:
    """One spec of a batch request, and whether it names source images (an edit)."""

    spec: GenerationSpec
    names_sources: bool = False


@dataclass(frozen=True)
class SubmittedBatch:
    """A batch's id and its jobs in request order, and whether this call made it (False:
    a retry with the same request_id got the batch an earlier call made)."""

    batch_id: str
    generations: tuple[Generation, ...]
    created: bool


class BatchService:
    """Validates, prices and queues batches of generation jobs, all or nothing."""

    def __init__(
        self,
        *,
        db: Database,
        submission: SubmissionService,
        catalogue: ProviderCatalogue,
        signals: JobSignals,
        settings: SubmissionSettings,
        max_specs: int,
        presenter: GenerationPresenter,
        moderation: ModerationService | None = None,
        callbacks: CallbackChecker | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._db = db
        #: its validation of one spec is the batch's validation of each
        self._submission = submission
        self._catalogue = catalogue
        self._signals = signals
        self._settings = settings
        self._max_specs = max_specs
        self._presenter = presenter
        #: None: texts are not moderated
        self._moderation = moderation
        #: None: a batch naming a callback_uri is refused
        self._callbacks = callbacks
        self._tracer = tracer or trace.get_tracer(__name__)

    def check_size(self, specs: int) -> None:
        """IMG_003 for an empty batch or one over IMAGEGEN_MAX_BATCH, before its specs
        are read."""
        check_batch_size(specs, self._max_specs)

    async def submit(
        self,
        identity: Identity,
        items: Sequence[BatchItem],
        request_id: str = "",
        callback_uri: str = "",
    ) -> SubmittedBatch:
        """Validate, moderate and queue every spec as its own job, in one unit of work
        (see the module docstring); the same request_id returns the same batch."""
        self.check_size(len(items))
        check_request_id(request_id)
        specs = await self._validated(identity, items)
        if callback_uri:
            if self._callbacks is None:
                raise InvalidRequest("callbacks are not enabled here", field="callback_uri")
            await self._callbacks.check_callback(callback_uri)
        if self._moderation is not None:
            await self._moderate(identity, specs)
        trace_context = current_trace_context()
        jobs = [
            NewGeneration(
                id=str(uuid.uuid4()),
                user_id=identity.user_id,
                sub_account=identity.sub_account,
                # The batch holds the request_id; its jobs are found through it.
                request_id="",
                spec=spec,
                provider=spec.provider,
                credits=self._settings.prices.image_price(spec) * spec.count,
                extra_spec={"trace_context": trace_context, "plan": identity.plan},
            )
            for spec in specs
        ]
        batch = NewBatch(
            id=str(uuid.uuid4()),
            user_id=identity.user_id,
            request_id=request_id,
            fingerprint=batch_fingerprint(specs, callback_uri),
            callback_uri=callback_uri,
            job_count=len(jobs),
        )
        limits = self._settings.plans.limits_for(identity.plan)
        batch_id, generations, created = await self._create(batch, jobs, limits)
        if created:
            self._signals.job_queued()
            for generation in generations:
                self._signals.job_changed(generation.id)
            log.info(
                "batch accepted",
                extra={
                    "event": "batch.accepted",
                    "batch_id": batch_id,
                    "user_id": identity.user_id,
                    "jobs": len(generations),
                    "credits": sum(job.credits for job in jobs),
                },
            )
        presented = await self._presenter.present_all(identity.user_id, generations)
        return SubmittedBatch(batch_id, tuple(presented), created)

    async def _validated(
        self, identity: Identity, items: Sequence[BatchItem]
    ) -> list[GenerationSpec]:
        """Every spec with its provider chosen as a single submit chooses it, checked as a
        single submit checks it; the first refusal names its spec."""
        chosen = ""
        if any(not item.spec.provider for item in items):
            chosen = await self._db.user_settings.default_provider(identity.user_id) or ""
        specs = []
        for index, item in enumerate(items):
            with about_spec(index):
                spec = item.spec
                if item.names_sources or spec.is_edit or spec.outpaint or spec.upscale:
                    raise InvalidRequest(
                        "a batch makes images from prompts only; submit edits one by one "
                        "with SubmitGeneration",
                        field="sources",
                    )
                if spec.callback_uri:
                    raise InvalidRequest(
                        "a batch's jobs have no callbacks of their own; name the batch's "
                        "callback_uri instead",
                        field="callback_uri",
                    )
                if not spec.provider:
                    spec = dataclasses.replace(
                        spec, provider=chosen or self._catalogue.default_provider
                    )
                with self._tracer.start_as_current_span("generation.validate"):
                    self._submission.validate(spec)
                specs.append(spec)
        return specs

    async def _moderate(self, identity: Identity, specs: list[GenerationSpec]) -> None:
        """Every spec's texts in one moderation check (one chain call and one recorded
        decision for the batch, as for one request), after validation and before limits,
        credits or any row, as a single submit; a block names the first blocked spec."""
        assert self._moderation is not None
        texts = {
            f"specs[{index}].{name}": text
            for index, spec in enumerate(specs)
            for name, text in spec_texts(spec).items()
        }
        try:
            await self._moderation.check(identity, texts, Purpose.GENERATE)
        except ContentBlocked as exc:
            blocked = _SPEC_FIELD.match(exc.metadata.get("fields", ""))
            if blocked is not None:
                exc.metadata.setdefault("index", blocked.group(1))
            raise

    async def _create(
        self, batch: NewBatch, jobs: list[NewGeneration], limits: PlanLimits
    ) -> tuple[str, list[Generation], bool]:
        """Store the batch and all of its jobs, within the user's plan limits, or nothing;
        returns the batch's id and jobs as stored (queued: read before the commit, so no
        worker has started one yet). An existing batch for the same request_id is
        returned instead (created=False, its jobs as they stand), or IMG_009 if its
        parameters differ. One transaction under the user's advisory lock."""
        user_id = batch.user_id
        ttl = self._settings.request_id_ttl
        async with self._db.unit_of_work() as uow:
            await uow.generations.lock_user(user_id)
            if batch.request_id:
                past = await uow.batches.find_request(
                    user_id, batch.request_id, remembered_for=ttl
                )
                if past is not None:
                    if past.fingerprint != batch.fingerprint:
                        raise _reused(batch.request_id, "a different batch")
                    generations = await uow.generations.batch_jobs(user_id, past.id)
                    await uow.commit()  # keeps the forgetting of expired request ids
                    return past.id, generations, False
                # Request ids are the caller's, whichever RPC used one first.
                single = await uow.generations.find_request(
                    user_id, batch.request_id, remembered_for=ttl
                )
                if single is not None:
                    raise _reused(batch.request_id, "a single generation")
            counts = await uow.generations.request_counts(user_id, counted_up_to(limits))
            check_batch_request_limits(counts, limits, len(jobs))
            now = datetime.now(UTC)
            facts = await uow.credits.open_period(user_id, limits.monthly_credits, now)
            reservations = plan_reservations(facts, [job.credits for job in jobs], now)
            if limits.storage_bytes is not None:
                check_storage_room(limits.storage_bytes, await uow.images.storage_used(user_id))
            await uow.batches.insert(batch)
            for job in jobs:
                await uow.generations.insert(job)
            await uow.batches.attach_jobs(
                batch.id, [job.id for job in jobs], max_concurrent=limits.concurrent
            )
            for job, reservation in zip(jobs, reservations, strict=True):
                await uow.credits.reserve(user_id, job.id, reservation)
                await uow.generations.announce_queued(job.id)
            generations = await uow.generations.batch_jobs(user_id, batch.id)
            await uow.commit()
            return batch.id, generations, True


def _reused(request_id: str, what: str) -> RequestIdReused:
    return RequestIdReused(
        f"request_id {request_id!r} was used for {what}; use a new request_id for new "
        "parameters",
        metadata={"request_id": request_id},
    )
