"""A caller's jobs: get one, list them, cancel one; each answered as the same resource,
with the images the job stored (fresh URLs; none for a soft-deleted image; a purged one
is gone) and its full spec.

A read is at most three statements whatever the page size: the job rows, the images of
all of them, and the webhook attempts of those that named a callback (GenerationPresenter).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from imagegen.domain import paging
from imagegen.domain.errors import InvalidRequest, NotFound
from imagegen.domain.models import (
    EditSource,
    Generation,
    GenerationState,
    Identity,
    StoredImage,
)
from imagegen.domain.plans import PlanTable
from imagegen.jobs.signals import JobSignals
from imagegen.services.unit_of_work import Database
from imagegen.services.webhooks.outbox import queue_job_webhook
from imagegen.storage.base import BlobStore


class GenerationPresenter:
    """Completes jobs as callers see them: their stored images, with fresh URLs, in one
    statement for any number of jobs, and signed URLs for sources stored before sources
    were kept as library images."""

    def __init__(self, *, db: Database, blobs: BlobStore, url_ttl: timedelta) -> None:
        self._db = db
        self._blobs = blobs
        self._url_ttl = url_ttl

    async def present(self, user_id: str, generation: Generation) -> Generation:
        """One of the owner's jobs with its images."""
        return (await self.present_all(user_id, [generation]))[0]

    async def present_all(self, user_id: str, generations: list[Generation]) -> list[Generation]:
        """The owner's jobs with their images and webhook attempts, in the order given."""
        images = await self._db.images.for_generations(user_id, [g.id for g in generations])
        return await self._completed(generations, images)

    async def present_read(self, generation: Generation, images: list[StoredImage]) -> Generation:
        """A job whose images were read with it (`get_with_images`), completed as
        `present` would."""
        return (await self._completed([generation], {generation.id: images}))[0]

    async def _completed(
        self, generations: list[Generation], images: dict[str, list[StoredImage]]
    ) -> list[Generation]:
        called = [g.id for g in generations if g.spec.callback_uri]
        attempts = await self._db.webhooks.attempts_for(called) if called else {}
        return [
            dataclasses.replace(
                generation,
                webhook_deliveries=attempts.get(generation.id, ()),
                images=tuple(
                    [await self.with_url(image) for image in images.get(generation.id, [])]
                ),
                spec=dataclasses.replace(
                    generation.spec,
                    sources=tuple([await self._shown(s) for s in generation.spec.sources]),
                    mask=await self._shown(generation.spec.mask) if generation.spec.mask else None,
                ),
            )
            for generation in generations
        ]

    async def with_url(self, image: StoredImage) -> StoredImage:
        """The image with a fresh signed URL, or with none while it is soft-deleted."""
        if image.deleted:
            return dataclasses.replace(image, url="")
        return await with_signed_url(self._blobs, image, self._url_ttl)

    async def _shown(self, source: EditSource) -> EditSource:
        # A library image is shown by its name; an older source has only its blob.
        if source.image_id:
            return source
        return dataclasses.replace(
            source, url=await self._blobs.signed_url(source.storage_key, self._url_ttl)
        )


class GenerationReads:
    """Get, list and cancel the caller's jobs; anyone else's are NotFound."""

    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        signals: JobSignals,
        url_ttl: timedelta,
        plans: PlanTable,
    ) -> None:
        self._db = db
        self._plans = plans
        self._signals = signals
        self._presenter = GenerationPresenter(db=db, blobs=blobs, url_ttl=url_ttl)

    async def get(self, identity: Identity, generation_id: str) -> Generation:
        """The caller's job with its images (fresh URLs); NotFound for anyone else's."""
        # One statement for the job and its images: the hottest read of a job.
        found = await self._db.generations.get_with_images(identity.user_id, generation_id)
        if found is None:
            raise NotFound(f"generation {generation_id!r} not found")
        return await self._presenter.present_read(*found)

    async def list_generations(
        self,
        identity: Identity,
        *,
        states: tuple[GenerationState, ...] = (),
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        batch_id: str = "",
    ) -> tuple[list[Generation], str]:
        """A page of the caller's jobs, newest first, each with its images, and the next
        page's token; only those of `batch_id` when one is given (none for anyone else's
        batch)."""
        size = paging.page_size(page_size)
        if created_from and created_before and created_from >= created_before:
            raise InvalidRequest(
                "create_time_start must be before create_time_end", field="create_time_start"
            )
        scope = "|".join(
            [",".join(sorted(s.value for s in states)), str(created_from), str(created_before)]
            + ([batch_id] if batch_id else [])
        )
        cursor = paging.decode_cursor(page_token, scope)
        page = await self._db.generations.list_for_user(
            identity.user_id,
            states=states,
            created_from=created_from,
            created_before=created_before,
            after=cursor,
            limit=size + 1,
            batch_id=batch_id,
        )
        next_token = ""
        if len(page) > size:
            page = page[:size]
            last = page[-1]
            next_token = paging.encode_cursor(paging.Cursor(last.created_at, last.id), scope)
        return await self._presenter.present_all(identity.user_id, page), next_token

    async def batch_jobs(self, identity: Identity, batch_id: str) -> list[Generation]:
        """Every job of one of the caller's batches, in request order, each as `get`
        shows it; empty for anyone else's batch."""
        jobs = await self._db.generations.batch_jobs(identity.user_id, batch_id)
        return await self._presenter.present_all(identity.user_id, jobs)

    async def cancel(self, identity: Identity, generation_id: str) -> Generation:
        """Cancel the caller's job: a queued one at once (CANCELLED, its whole reservation
        refunded, in one unit of work), a running one at its worker's next checkpoint
        (its provider call is abandoned). A finished job is returned as it is."""
        async with self._db.unit_of_work() as uow:
            generation = await uow.generations.lock_owned(identity.user_id, generation_id)
            if generation is None:
                raise NotFound(f"generation {generation_id!r} not found")
            if generation.state is GenerationState.QUEUED:
                generation = await uow.generations.cancel_queued(generation.id)
                # Nothing was delivered: the whole reservation goes back.
                await uow.credits.settle(
                    identity.user_id,
                    generation.id,
                    0,
                    allowance=self._plans.limits_for(generation.plan).monthly_credits,
                    now=datetime.now(UTC),
                )
                # After the settlement, as the pipeline's end of a job (see its docstring).
                await queue_job_webhook(uow, generation, GenerationState.CANCELLED)
            elif generation.state is GenerationState.RUNNING:
                generation = await uow.generations.request_cancel(generation.id)
            await uow.generations.notify_changed(generation.id)
            await uow.commit()
        self._signals.job_changed(generation.id)
        self._signals.cancel_requested(generation.id)
        return await self._presenter.present(identity.user_id, generation)


async def with_signed_url(blobs: BlobStore, image: StoredImage, ttl: timedelta) -> StoredImage:
    """The image with a URL that fetches it without credentials for `ttl`."""
    url = await blobs.signed_url(image.storage_key, ttl)
    return dataclasses.replace(image, url=url)
