"""A caller's jobs: get one (with fresh image URLs), list them, cancel one."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from imagegen.domain import paging
from imagegen.domain.errors import InvalidRequest, NotFound
from imagegen.domain.models import Generation, GenerationState, Identity, StoredImage
from imagegen.jobs.signals import JobSignals
from imagegen.services.unit_of_work import Database
from imagegen.services.webhooks.outbox import queue_job_webhook
from imagegen.storage.base import BlobStore


class GenerationReads:
    """Get, list and cancel the caller's jobs; anyone else's are NotFound."""

    def __init__(
        self, *, db: Database, blobs: BlobStore, signals: JobSignals, url_ttl: timedelta
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._signals = signals
        self._url_ttl = url_ttl

    async def get(self, identity: Identity, generation_id: str) -> Generation:
        """The caller's job with its images (fresh URLs); NotFound for anyone else's."""
        generation = await self._db.generations.get(identity.user_id, generation_id)
        if generation is None:
            raise NotFound(f"generation {generation_id!r} not found")
        images = await self._db.images.for_generation(generation.id)
        with_urls = tuple(
            [await with_signed_url(self._blobs, img, self._url_ttl) for img in images]
        )
        (generation,) = await self._with_webhook_deliveries([generation])
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
        page = await self._db.generations.list_for_user(
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
        return await self._with_webhook_deliveries(page), next_token

    async def _with_webhook_deliveries(self, jobs: list[Generation]) -> list[Generation]:
        """The jobs with their webhook's attempts (one query, only for jobs that named a
        callback)."""
        called = [job.id for job in jobs if job.spec.callback_uri]
        if not called:
            return jobs
        attempts = await self._db.webhooks.attempts_for(called)
        return [
            dataclasses.replace(job, webhook_deliveries=attempts.get(job.id, ()))
            for job in jobs
        ]

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
                await queue_job_webhook(uow, generation, GenerationState.CANCELLED)
                # Nothing was delivered: the whole reservation goes back.
                await uow.credits.settle(identity.user_id, generation.id, 0)
            elif generation.state is GenerationState.RUNNING:
                generation = await uow.generations.request_cancel(generation.id)
            await uow.generations.notify_changed(generation.id)
            await uow.commit()
        self._signals.job_changed(generation.id)
        self._signals.cancel_requested(generation.id)
        return generation


async def with_signed_url(blobs: BlobStore, image: StoredImage, ttl: timedelta) -> StoredImage:
    """The image with a URL that fetches it without credentials for `ttl`."""
    url = await blobs.signed_url(image.storage_key, ttl)
    return dataclasses.replace(image, url=url)
