"""Watching a job: its stored events after a sequence number, then live ones, until the
terminal event (COMPLETED, FAILED or CANCELLED).

A watcher subscribes to the job's feed (jobs/signals.py), then reads the log once. After
that it reads again only when signalled that the log grew elsewhere (a NOTIFY from
another replica, a listener reconnect) or when the events this process handed over in
memory leave a gap; while the job is quiet it issues no statement at all. Sequence
numbers decide what is new, so a watcher can start, stop and start again on any replica
without missing or repeating an event.

Open streams are counted per user in this process and capped by the plan's
`max_streams` (domain/plans.py): a replica refuses the stream past the cap with
STREAM_LIMIT. The count is per replica (see the WatchGeneration comment in
proto/imagegen/v1/generation.proto): counting across replicas would cost a database
write per stream and leave stale counts behind a replica that dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta

from imagegen.domain.errors import NotFound, ShuttingDown, StreamLimit
from imagegen.domain.models import EventType, Generation, GenerationEvent, Identity
from imagegen.domain.plans import PlanTable
from imagegen.jobs.signals import JobSignals
from imagegen.services.generations.reads import with_signed_url
from imagegen.services.unit_of_work import Database
from imagegen.storage.base import BlobStore


class StreamSlots:
    """Open streams per user in this process, capped by their plan's `max_streams`."""

    def __init__(self, plans: PlanTable) -> None:
        self._plans = plans
        self._open: dict[str, int] = {}

    def open_for(self, user_id: str) -> int:
        """How many streams the user has open here."""
        return self._open.get(user_id, 0)

    @contextlib.contextmanager
    def hold(self, identity: Identity) -> Iterator[None]:
        """One slot for the duration of a stream; StreamLimit when the user has none left."""
        cap = self._plans.limits_for(identity.plan).max_streams
        held = self._open.get(identity.user_id, 0)
        if cap is not None and held >= cap:
            raise StreamLimit(
                f"you have {held} open streams, the most your plan allows on one server; "
                "close one (or wait for a job to end) and try again",
                metadata={"max_streams": str(cap)},
            )
        self._open[identity.user_id] = held + 1
        try:
            yield
        finally:
            left = self._open[identity.user_id] - 1
            if left:
                self._open[identity.user_id] = left
            else:
                del self._open[identity.user_id]


class GenerationWatch:
    """Streams a caller's job events; sends watchers elsewhere when this replica drains."""

    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        signals: JobSignals,
        plans: PlanTable,
        runs_here: Callable[[str], bool],
        url_ttl: timedelta,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._signals = signals
        #: whether this process is executing a job (pipeline.JobPipeline.runs_here)
        self._runs_here = runs_here
        self._url_ttl = url_ttl
        self._draining = False
        self.slots = StreamSlots(plans)

    def stream_slot(self, identity: Identity) -> contextlib.AbstractContextManager[None]:
        """Hold one of the caller's open-stream slots while a GenerateImage or
        WatchGeneration stream is open (StreamLimit past the plan's cap)."""
        return self.slots.hold(identity)

    def begin_drain(self) -> None:
        """This replica is shutting down: watchers of jobs it is not running are told
        to go elsewhere (ShuttingDown, UNAVAILABLE); the others follow their job to its end
        or until it is handed back to the queue."""
        self._draining = True
        self._signals.wake_all()

    async def watch(
        self, identity: Identity, generation_id: str, after_sequence: int = 0
    ) -> AsyncIterator[GenerationEvent]:
        """Stored events after `after_sequence`, then live ones, until the terminal one.
        At or past a finished job's last sequence, nothing: the stream ends at once."""
        generation = await self._db.generations.get(identity.user_id, generation_id)
        if generation is None:
            raise NotFound(f"generation {generation_id!r} not found")
        async for event in self.follow(generation, after_sequence):
            yield event

    async def follow(
        self, generation: Generation, after_sequence: int = 0
    ) -> AsyncIterator[GenerationEvent]:
        """`watch` for a job already read (the caller's, e.g. just submitted)."""
        last = max(after_sequence, 0)
        if generation.state.terminal and last >= generation.last_sequence:
            return
        with self._signals.watch_job(generation.id) as feed:
            # Subscribed first: whatever commits after the read below reaches the feed.
            must_read = True
            while True:
                handed, stale = feed.take()
                fresh = [event for event in handed if event.sequence > last]
                # The job ended at or before the sequence this watch started after.
                finished = any(e.type.terminal for e in handed if e.sequence <= last)
                if fresh and [e.sequence for e in fresh] != list(
                    range(last + 1, last + 1 + len(fresh))
                ):
                    stale = True  # some were appended without reaching this feed
                read_nothing = False
                if (must_read or stale) and not finished:
                    page = await self._db.generations.read_log(generation.id, last)
                    events = page.events
                    # A full page may have more behind it.
                    must_read = page.full
                    finished = not events and page.state.terminal
                    read_nothing = not events
                else:
                    events = fresh
                for event in events:
                    last = event.sequence
                    yield await self._with_image(event)
                    if event.type.terminal:
                        return
                if finished:
                    # Watched from past the terminal event: nothing more will come.
                    return
                if self._draining and not self._runs_here(generation.id):
                    # The job may have ended here while the events above were being
                    # sent (its last events are stored before it leaves `runs_here`):
                    # only a read that finds nothing new sends the watcher elsewhere.
                    if not read_nothing:
                        must_read = True
                        continue
                    raise ShuttingDown(
                        "this replica is shutting down; watch again with after_sequence="
                        f"{last} and another replica will follow the job",
                        metadata={"after_sequence": str(last)},
                    )
                if not events and not must_read:
                    await feed.changed.wait()

    async def _with_image(self, event: GenerationEvent) -> GenerationEvent:
        """An IMAGE_READY event with its image as it now stands: a fresh URL, or none
        once it is soft-deleted, and no image at all once it is purged. Others as they are."""
        if event.type is not EventType.IMAGE_READY:
            return event
        image = event.image
        if image is None:
            image = await self._db.images.get_by_id(event.extra.get("image_id", ""))
            if image is None:
                return event
        if image.deleted:
            return dataclasses.replace(event, image=image)
        return dataclasses.replace(
            event, image=await with_signed_url(self._blobs, image, self._url_ttl)
        )
