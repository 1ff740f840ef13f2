"""Wake-ups for watchers and workers.

A signal only says "look again": watchers always read events from the table, so
a lost signal costs latency (until the next poll), never an event. Signals come
from this process directly and from other replicas through PostgreSQL
LISTEN/NOTIFY on a dedicated connection that is re-opened when it drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

import asyncpg

from imagegen.repositories.generations import CANCEL_CHANNEL, EVENTS_CHANNEL, QUEUE_CHANNEL

log = logging.getLogger(__name__)


class JobSignals:
    """Per-job and queue-wide wake-ups, shared by every watcher in this process."""

    def __init__(self) -> None:
        self._job_waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._cancel_waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._queue_waiters: set[asyncio.Event] = set()

    def job_changed(self, generation_id: str) -> None:
        """Wake everyone watching this job."""
        for event in list(self._job_waiters.get(generation_id, ())):
            event.set()

    def cancel_requested(self, generation_id: str) -> None:
        """Wake the worker running this job: its owner cancelled it."""
        for event in list(self._cancel_waiters.get(generation_id, ())):
            event.set()

    def job_queued(self) -> None:
        """Wake workers looking for queued jobs."""
        for event in list(self._queue_waiters):
            event.set()

    def wake_all(self) -> None:
        """Wake every waiter (after a lost listener connection, anything may have changed)."""
        for table in (self._job_waiters, self._cancel_waiters):
            for waiters in list(table.values()):
                for event in list(waiters):
                    event.set()
        self.job_queued()

    @contextlib.contextmanager
    def watch_job(self, generation_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the job's log may have grown; subscribe before reading."""
        with _subscribed(self._job_waiters, generation_id) as event:
            yield event

    @contextlib.contextmanager
    def watch_cancel(self, generation_id: str) -> Iterator[asyncio.Event]:
        """An event set when the job's owner may have cancelled it."""
        with _subscribed(self._cancel_waiters, generation_id) as event:
            yield event

    @contextlib.contextmanager
    def watch_queue(self) -> Iterator[asyncio.Event]:
        """An event set whenever a job may have been queued."""
        event = asyncio.Event()
        self._queue_waiters.add(event)
        try:
            yield event
        finally:
            self._queue_waiters.discard(event)


@contextlib.contextmanager
def _subscribed(
    table: defaultdict[str, set[asyncio.Event]], generation_id: str
) -> Iterator[asyncio.Event]:
    event = asyncio.Event()
    table[generation_id].add(event)
    try:
        yield event
    finally:
        waiters = table.get(generation_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del table[generation_id]


class NotificationListener:
    """Holds one LISTEN connection and turns NOTIFYs into JobSignals; reconnects
    after the connection is lost (e.g. pg_terminate_backend)."""

    def __init__(self, dsn: str, signals: JobSignals, *, retry_delay: float = 0.5) -> None:
        self._dsn = dsn
        self._signals = signals
        self._retry_delay = retry_delay
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.backend_pid: int | None = None

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
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(EVENTS_CHANNEL, self._on_event)
                await conn.add_listener(QUEUE_CHANNEL, self._on_queue)
                await conn.add_listener(CANCEL_CHANNEL, self._on_cancel)
                self.backend_pid = conn.get_server_pid()
                self._connected.set()
                # Anything may have happened while we were not listening.
                self._signals.wake_all()
                await lost.wait()
                log.warning("notification listener connection lost; reconnecting")
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("notification listener cannot connect: %s", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=5)
            self._signals.wake_all()
            await asyncio.sleep(self._retry_delay)

    def _on_event(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._signals.job_changed(payload)

    def _on_queue(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self._signals.job_queued()

    def _on_cancel(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._signals.cancel_requested(payload)
