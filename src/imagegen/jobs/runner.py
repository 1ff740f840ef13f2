"""Workers: claim queued jobs from PostgreSQL, hold their lease, run them (through the
pipeline of services/generations/pipeline.py, passed in as `execute`).

Each served process runs one JobRunner with a fixed number of slots. A job is
claimed with FOR UPDATE SKIP LOCKED (the claim also appends its STARTED event), its
lease renewed by a heartbeat while it runs; a process that dies stops renewing and
another one takes the job again. On shutdown the runner stops claiming, lets running
jobs finish within the grace period and hands the rest back to the queue.

The claim loop does not poll for queued jobs: it claims when a job is queued or handed
back (a signal from this process or a NOTIFY), when one of its slots frees, and when
the first lease held by another worker runs out (the last claim says when); a listener
reconnect wakes it too. A worker that dies holding a job sends nothing, and one that
claimed after our last claim is unknown to us, so an idle loop also claims every half
lease: a dead worker's job is taken again within 1.5 leases at worst.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate

from imagegen.domain.models import Generation
from imagegen.jobs.signals import CancelCollector, CancelFlag, JobSignals
from imagegen.jobs.tasks import finish_within, stop_loop
from imagegen.repositories.generations import ClaimedJob, GenerationRepository

log = logging.getLogger(__name__)

#: Seconds between refreshes of the queue-depth gauge's reading (while claiming).
STATS_INTERVAL = 5.0
#: Shortest wait before claiming a job whose lease ran out but was locked (being
#: claimed by another worker) or not yet expired at the database's clock.
MIN_LEASE_WAIT = 0.1

#: Runs a claimed job; the CancelFlag says when its owner cancels it.
JobExecutor = Callable[[ClaimedJob, str, CancelFlag], Coroutine[Any, Any, None]]


class JobRunner:
    """Owns the claim loop and every job task it starts."""

    def __init__(
        self,
        generations: GenerationRepository,
        execute: JobExecutor,
        signals: JobSignals,
        *,
        workers: int,
        lease: timedelta,
        max_attempts: int,
        retry_delay: float = 1.0,
        worker_id: str | None = None,
    ) -> None:
        self._generations = generations
        self._execute = execute
        self._signals = signals
        self._workers = workers
        self._lease = lease
        self._max_attempts = max_attempts
        #: seconds before claiming again after a claim failed
        self._retry_delay = retry_delay
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: (queued jobs, age of the oldest in seconds), refreshed by the claim loop
        self.queue_stats: tuple[int, float] = (0, 0.0)
        self._stats_read_at = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._claiming = True
        #: set when a running job ends here
        self._slot_freed = asyncio.Event()
        #: whether queued jobs may be waiting that no claim has seen come back short
        self._backlog = True
        #: monotonic time the first lease held by another worker runs out, if any
        self._lease_deadline: float | None = None
        #: monotonic time to retry a claim that failed
        self._retry_at: float | None = None

    @property
    def running_jobs(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._claim_loop(), name="imagegen-claim-loop")

    async def stop(self, grace: float) -> None:
        """Stop claiming; wait up to `grace` seconds for running jobs; hand back the rest."""
        self._claiming = False
        await stop_loop(self._loop_task)
        await finish_within(self._tasks.values(), grace)

    async def _refresh_queue_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_read_at < STATS_INTERVAL:
            return
        self._stats_read_at = now
        try:
            self.queue_stats = await self._generations.queue_stats()
        except Exception:
            log.warning("reading queue depth failed", exc_info=True)

    async def _claim_loop(self) -> None:
        while self._claiming:
            await self._refresh_queue_stats()
            self._slot_freed.clear()
            # Subscribed before claiming: a job queued meanwhile wakes the wait below.
            with self._signals.watch_queue() as queued:
                free = self._workers - len(self._tasks)
                if free > 0 and self._backlog:
                    await self._claim(free)
                woken = await _any_set((queued, self._slot_freed), within=self._idle_wait())
                if queued.is_set() or not woken:
                    # A job was queued or handed back, or a lease ran out: claim again.
                    # A freed slot alone needs no claim after one that came back short.
                    self._backlog = True

    def _idle_wait(self) -> float:
        """Seconds until the next claim unless signalled: a failed claim's retry, or when
        the first lease held by another worker runs out (as the last claim said), at
        most half a lease. A moment that has come is used once: the claim it leads to (now,
        or when a slot frees) learns the next one."""
        now = time.monotonic()
        for moment in (self._retry_at, self._lease_deadline):
            if moment is not None and moment <= now:
                self._retry_at = self._lease_deadline = None
                # Not 0: a lease that ran out but stays locked (another worker is taking
                # it) must not make this loop spin.
                return MIN_LEASE_WAIT
        if self._retry_at is not None:
            return self._retry_at - now
        backstop = max(self._lease.total_seconds() / 2, MIN_LEASE_WAIT)
        if self._lease_deadline is None:
            return backstop
        return min(max(self._lease_deadline - now, MIN_LEASE_WAIT), backstop)

    async def _claim(self, free: int) -> None:
        """Claim up to `free` jobs and start them; note when to claim again unasked."""
        self._backlog = False
        self._retry_at = None
        with self._signals.collect_cancels() as early:
            try:
                claim = await self._generations.claim(
                    self.worker_id, self._lease, free, max_attempts=self._max_attempts
                )
            except Exception:
                log.exception("claiming jobs failed; retrying")
                self._backlog = True
                self._retry_at = time.monotonic() + self._retry_delay
                return
        for job in claim.jobs:
            self._spawn(job, early)
        if len(claim.jobs) == free:
            # Every slot is taken; more may be queued: claim when one frees.
            self._backlog = True
        expiry = claim.next_lease_expiry
        self._lease_deadline = (
            None if expiry is None else time.monotonic() + expiry.total_seconds()
        )

    def _spawn(self, job: ClaimedJob, early: CancelCollector) -> None:
        generation_id = job.generation.id
        # Subscribed now, before any other callback runs: with the cancels collected
        # while the claim was in flight and the row's own flag, none can be missed.
        cancel = self._signals.subscribe_cancel(generation_id)
        early.flag_for(generation_id, cancel, in_row=job.cancel_requested)
        if job.started is not None:
            self._signals.job_events(generation_id, (job.started,))
        task = asyncio.create_task(
            self._run(job, cancel),
            name=f"imagegen-job-{generation_id}",
            context=_job_context(job.generation),
        )
        self._tasks[generation_id] = task

        def _done(_t: asyncio.Task[None]) -> None:
            # A job's end that lets the owner's held batch jobs run is signalled as a
            # queued job (the pipeline's finish), here and on every replica.
            cancel.close()
            self._tasks.pop(generation_id, None)
            self._slot_freed.set()

        task.add_done_callback(_done)

    async def _run(self, claimed: ClaimedJob, cancel: CancelFlag) -> None:
        job = claimed.generation
        heartbeat = asyncio.create_task(self._heartbeat(job.id), name=f"imagegen-lease-{job.id}")
        work = asyncio.create_task(
            self._execute(claimed, self.worker_id, cancel), name=f"imagegen-run-{job.id}"
        )
        try:
            await asyncio.wait({work, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                # The lease was lost (this process stalled past it and another worker
                # took the job): stop working on a job that is no longer ours.
                log.warning("lost the lease of %s; abandoning it", job.id)
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            elif work.exception() is not None:
                log.error(
                    "job %s crashed outside its error handling", job.id, exc_info=work.exception()
                )
        except asyncio.CancelledError:
            # Shutdown: the job goes back to the queue for another worker.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            with contextlib.suppress(Exception):
                await asyncio.shield(self._generations.release(job.id, self.worker_id))
                self._signals.job_changed(job.id)
            raise
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _heartbeat(self, generation_id: str) -> None:
        interval = max(self._lease.total_seconds() / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._generations.renew_lease(
                    generation_id, self.worker_id, self._lease
                ):
                    return
            except Exception:
                log.warning("renewing the lease of %s failed", generation_id, exc_info=True)


async def _any_set(events: tuple[asyncio.Event, ...], *, within: float) -> bool:
    """Wait until one of `events` is set; False if none was within `within` seconds."""
    if any(event.is_set() for event in events):
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)


def _job_context(job: Generation) -> contextvars.Context:
    """A copy of the current context in which the submitting request's trace is current,
    so everything the job does (its log lines, its spans, its lease heartbeats) joins the
    caller's trace. The token is never detached: the context dies with the job's task."""
    context = contextvars.copy_context()
    context.run(otel_context.attach, propagate.extract(job.trace_context))
    return context
