"""Wake-ups for watchers and workers: one LISTEN connection per process fans out to
every watch stream and every running job here.

The event log in PostgreSQL is the truth; a signal says either "here are the events
this process just appended" (delivered in memory, in order, with their sequence
numbers) or "the log may have grown: read it". A watcher (services/generations/
watch.py) reads the log only for the second kind, or when the events handed to it
leave a gap, so no stream polls the database while its job is quiet.

How no wake-up is lost:
- A watcher subscribes before it reads, so anything committed after its read either
  reaches its feed or marks it stale.
- Every change this process commits is signalled here, in memory, after the commit;
  its own NOTIFYs (recognised by the sending backend's pid, repositories/db.py
  BackendPids) are therefore ignored instead of making every watcher read again.
- Other replicas' changes arrive as NOTIFYs on the listener connection (sent only when
  their transaction commits). While that connection is down nothing arrives, so every
  reconnect (and a heartbeat that finds a silent connection dead) wakes every watcher
  and worker to read again.
- A worker learns of a cancel through its CancelFlag, subscribed when its job is
  claimed; cancels that arrive while the claim is in flight are collected
  (`collect_cancels`), and what was committed before it is in the claimed row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Iterator
from typing import TypeVar

import asyncpg

from imagegen.domain.models import GenerationEvent
from imagegen.repositories.generations import CANCEL_CHANNEL, EVENTS_CHANNEL, QUEUE_CHANNEL
from imagegen.repositories.webhooks import WEBHOOK_CHANNEL

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Events a feed holds for a watcher that has not taken them yet; past this the feed
#: drops them and the watcher reads the log instead (a slow client costs no memory).
FEED_LIMIT = 64


class JobFeed:
    """One watcher's subscription to one job: the events this process appended since
    the watcher last looked, and whether it must read the log."""

    def __init__(self) -> None:
        #: set whenever there is something to look at
        self.changed = asyncio.Event()
        self._events: list[GenerationEvent] = []
        self._stale = False

    def publish(self, events: Iterable[GenerationEvent]) -> None:
        """Events just committed by this process, in sequence order."""
        if not self._stale:
            self._events.extend(events)
            if len(self._events) > FEED_LIMIT:
                self.mark_stale()
        self.changed.set()

    def mark_stale(self) -> None:
        """The log may hold events this feed has not seen: read it."""
        self._stale = True
        self._events.clear()
        self.changed.set()

    def take(self) -> tuple[list[GenerationEvent], bool]:
        """The events published since the last take, and whether the log must be read
        (then the events are incomplete and dropped). Clears `changed`."""
        self.changed.clear()
        events, stale = self._events, self._stale
        self._events, self._stale = [], False
        return ([] if stale else events), stale


class CancelFlag:
    """A running job's cancel signal, held by its worker from claim to end."""

    def __init__(self, unsubscribe: Callable[[], None] = lambda: None) -> None:
        #: set whenever `requested` or `uncertain` becomes true
        self.changed = asyncio.Event()
        #: the owner's cancel was committed (this process's own, or a NOTIFY)
        self.requested = False
        #: a cancel may have been missed (the listener was down): check the database
        self.uncertain = False
        self._unsubscribe = unsubscribe

    def request(self) -> None:
        self.requested = True
        self.changed.set()

    def mark_uncertain(self) -> None:
        self.uncertain = True
        self.changed.set()

    def close(self) -> None:
        """Stop receiving signals (the job ended here)."""
        self._unsubscribe()


class CancelCollector:
    """The cancels signalled while a claim is in flight, for the jobs it returns."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        #: the listener reconnected meanwhile: any cancel may have been missed
        self.everything = False

    def flag_for(self, generation_id: str, flag: CancelFlag, *, in_row: bool) -> None:
        """Bring a freshly subscribed flag up to date with what the claim may have missed."""
        if in_row or generation_id in self.ids:
            flag.request()
        elif self.everything:
            flag.mark_uncertain()


class JobSignals:
    """Per-job and queue-wide wake-ups, shared by every watcher and worker in this process."""

    def __init__(self) -> None:
        self._feeds: defaultdict[str, set[JobFeed]] = defaultdict(set)
        self._cancel_flags: defaultdict[str, set[CancelFlag]] = defaultdict(set)
        self._collectors: set[CancelCollector] = set()
        self._queue_waiters: set[asyncio.Event] = set()
        self._webhook_waiters: set[asyncio.Event] = set()

    @property
    def watchers(self) -> int:
        """Open job feeds in this process (every watch stream holds one)."""
        return sum(len(feeds) for feeds in self._feeds.values())

    def job_events(self, generation_id: str, events: Iterable[GenerationEvent]) -> None:
        """Hand events this process just committed to the job's watchers here."""
        appended = list(events)
        for feed in list(self._feeds.get(generation_id, ())):
            feed.publish(appended)

    def job_changed(self, generation_id: str) -> None:
        """The job's log may have grown (elsewhere, or in a way not handed over here):
        its watchers read it."""
        for feed in list(self._feeds.get(generation_id, ())):
            feed.mark_stale()

    def cancel_requested(self, generation_id: str) -> None:
        """The job's owner cancelled it (committed): tell the worker running it here."""
        for flag in list(self._cancel_flags.get(generation_id, ())):
            flag.request()
        for collector in self._collectors:
            collector.ids.add(generation_id)

    def job_queued(self) -> None:
        """Wake workers looking for queued jobs."""
        for event in list(self._queue_waiters):
            event.set()

    def wake_all(self) -> None:
        """Wake every waiter: after a lost listener connection anything may have changed."""
        for feeds in list(self._feeds.values()):
            for feed in list(feeds):
                feed.mark_stale()
        for flags in list(self._cancel_flags.values()):
            for flag in list(flags):
                flag.mark_uncertain()
        for collector in self._collectors:
            collector.everything = True
        self.job_queued()
        self.webhook_due()

    def webhook_due(self) -> None:
        """Wake webhook workers: a callback may be due now."""
        for event in list(self._webhook_waiters):
            event.set()

    @contextlib.contextmanager
    def watch_job(self, generation_id: str) -> Iterator[JobFeed]:
        """A feed of the job's changes; subscribe before reading the log."""
        feed = JobFeed()
        self._feeds[generation_id].add(feed)
        try:
            yield feed
        finally:
            _discard(self._feeds, generation_id, feed)

    def subscribe_cancel(self, generation_id: str) -> CancelFlag:
        """A cancel flag for a job this process runs; `close()` it when the job ends."""
        flag = CancelFlag(lambda: _discard(self._cancel_flags, generation_id, flag))
        self._cancel_flags[generation_id].add(flag)
        return flag

    @contextlib.contextmanager
    def collect_cancels(self) -> Iterator[CancelCollector]:
        """Record cancels signalled while this block runs (a claim in flight)."""
        collector = CancelCollector()
        self._collectors.add(collector)
        try:
            yield collector
        finally:
            self._collectors.discard(collector)

    @contextlib.contextmanager
    def watch_webhooks(self, event: asyncio.Event | None = None) -> Iterator[asyncio.Event]:
        """`event` (or a new one), set whenever a callback may have become due now."""
        event = event or asyncio.Event()
        self._webhook_waiters.add(event)
        try:
            yield event
        finally:
            self._webhook_waiters.discard(event)

    @contextlib.contextmanager
    def watch_queue(self) -> Iterator[asyncio.Event]:
        """An event set whenever a job may have been queued (or a slot freed)."""
        event = asyncio.Event()
        self._queue_waiters.add(event)
        try:
            yield event
        finally:
            self._queue_waiters.discard(event)


def _discard(table: defaultdict[str, set[_T]], key: str, item: _T) -> None:
    members = table.get(key)
    if members is not None:
        members.discard(item)
        if not members:
            del table[key]


class NotificationListener:
    """Holds one LISTEN connection and turns other processes' NOTIFYs into JobSignals;
    reconnects after the connection is lost (e.g. pg_terminate_backend) and checks a
    connection that has been silent for `heartbeat` seconds."""

    def __init__(
        self,
        dsn: str,
        signals: JobSignals,
        *,
        own_pids: Container[int] = frozenset(),
        retry_delay: float = 0.5,
        heartbeat: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._signals = signals
        #: backend pids of this process's pool: their NOTIFYs were signalled in memory
        self._own_pids = own_pids
        self._retry_delay = retry_delay
        self._heartbeat = heartbeat
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._last_heard = 0.0
        self.backend_pid: int | None = None
        #: NOTIFYs received, and those of them ignored as this process's own
        self.received = 0
        self.ignored = 0

    async def start(self) -> None:
        """Connect and start listening; returns once the first connection listens."""
        self._task = asyncio.create_task(self._run(), name="imagegen-notify-listener")
        await asyncio.wait_for(self._connected.wait(), timeout=30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(EVENTS_CHANNEL, self._on_event)
                await conn.add_listener(QUEUE_CHANNEL, self._on_queue)
                await conn.add_listener(CANCEL_CHANNEL, self._on_cancel)
                await conn.add_listener(WEBHOOK_CHANNEL, self._on_webhook)
                self.backend_pid = conn.get_server_pid()
                self._connected.set()
                # Anything may have happened while we were not listening.
                self._signals.wake_all()
                self._last_heard = loop.time()
                while not lost.is_set():
                    quiet_for = loop.time() - self._last_heard
                    if quiet_for < self._heartbeat:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
                        # cancel (stop()) that lands as `lost` is set, and the loop
                        # would reconnect forever.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self._heartbeat - quiet_for):
                                await lost.wait()
                        continue
                    # Silent for a while: a connection cut without a FIN (a network
                    # partition) would never say so; a statement finds out.
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=10)
                    self._last_heard = loop.time()
                log.warning("notification listener connection lost; reconnecting")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("notification listener cannot connect or was cut off: %s", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=5)
            self._signals.wake_all()
            await asyncio.sleep(self._retry_delay)

    def _heard(self, pid: int) -> bool:
        """Note traffic; whether the NOTIFY came from another process."""
        self._last_heard = asyncio.get_running_loop().time()
        self.received += 1
        if pid in self._own_pids:
            self.ignored += 1
            return False
        return True

    def _on_event(self, _conn: object, pid: int, _channel: str, payload: str) -> None:
        if self._heard(pid):
            self._signals.job_changed(payload)

    def _on_queue(self, _conn: object, pid: int, _channel: str, _payload: str) -> None:
        if self._heard(pid):
            self._signals.job_queued()

    def _on_cancel(self, _conn: object, pid: int, _channel: str, payload: str) -> None:
        if self._heard(pid):
            self._signals.cancel_requested(payload)

    def _on_webhook(self, _conn: object, pid: int, _channel: str, _payload: str) -> None:
        # This process's own NOTIFYs count too: a callback is queued by the units of work
        # that end jobs and batches, in several places, and hearing it back one round trip
        # later spares each of them a signal of its own.
        self._last_heard = asyncio.get_running_loop().time()
        self.received += 1
        self._signals.webhook_due()
