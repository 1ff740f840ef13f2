"""Watching a job: its stored events after a sequence number, then live ones, until the
terminal event (COMPLETED, FAILED or CANCELLED).

Events are always read from the job's log in PostgreSQL; a signal (from this process,
or from another replica through LISTEN/NOTIFY, see jobs/signals.py) only says "read
again", and a poll covers a lost one. So a watcher can start, stop and start again on
any replica without missing or repeating an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from imagegen.domain.errors import NotFound, ShuttingDown
from imagegen.domain.models import EventType, GenerationEvent, Identity
from imagegen.jobs.signals import JobSignals
from imagegen.services.generations.reads import with_signed_url
from imagegen.services.unit_of_work import Database
from imagegen.storage.base import BlobStore


class GenerationWatch:
    """Streams a caller's job events; sends watchers elsewhere when this replica drains."""

    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        signals: JobSignals,
        runs_here: Callable[[str], bool],
        url_ttl: timedelta,
        poll_interval: float = 1.0,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._signals = signals
        #: whether this process is executing a job (pipeline.JobPipeline.runs_here)
        self._runs_here = runs_here
        self._url_ttl = url_ttl
        self._poll_interval = poll_interval
        self._draining = False

    def begin_drain(self) -> None:
        """This replica is shutting down: watchers of jobs it is not running are told
        to go elsewhere (ShuttingDown, UNAVAILABLE); the others follow their job to its end
        or until it is handed back to the queue."""
        self._draining = True
        self._signals.wake_all()

    async def watch(
        self, identity: Identity, generation_id: str, after_sequence: int = 0
    ) -> AsyncIterator[GenerationEvent]:
        """Stored events after `after_sequence`, then live ones, until the terminal one."""
        generation = await self._db.generations.get(identity.user_id, generation_id)
        if generation is None:
            raise NotFound(f"generation {generation_id!r} not found")
        last = max(after_sequence, 0)
        while True:
            # Subscribed before reading, so a change between the read and the wait wakes us.
            with self._signals.watch_job(generation.id) as changed:
                events = await self._db.generations.events_after(generation.id, last)
                for event in events:
                    last = event.sequence
                    yield await self._with_image(event)
                    if event.type.terminal:
                        return
                if self._draining and not self._runs_here(generation.id):
                    # The job may have ended here while the events above were being
                    # sent: its last events are stored before it leaves `runs_here`.
                    if await self._db.generations.events_after(generation.id, last):
                        continue
                    raise ShuttingDown(
                        "this replica is shutting down; watch again with after_sequence="
                        f"{last} and another replica will follow the job",
                        metadata={"after_sequence": str(last)},
                    )
                if not events:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), timeout=self._poll_interval)

    async def _with_image(self, event: GenerationEvent) -> GenerationEvent:
        """An IMAGE_READY event with its image as it now stands: a fresh URL, or none
        once it is soft-deleted, and no image at all once it is purged. Others as they are."""
        if event.type is not EventType.IMAGE_READY:
            return event
        image = await self._db.images.get_by_id(event.extra.get("image_id", ""))
        if image is None:
            return event
        if image.deleted:
            return dataclasses.replace(event, image=image)
        return dataclasses.replace(
            event, image=await with_signed_url(self._blobs, image, self._url_ttl)
        )
