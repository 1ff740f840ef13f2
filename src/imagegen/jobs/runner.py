"""Workers: claim queued jobs from PostgreSQL, hold their lease, run them (through the
pipeline of services/generations/pipeline.py, passed in as `execute`).

Each served process runs one JobRunner with a fixed number of slots. A job is
claimed with FOR UPDATE SKIP LOCKED, its lease renewed by a heartbeat while it
runs; a process that dies stops renewing and another one takes the job again.
On shutdown the runner stops claiming, lets running jobs finish within the
grace period and hands the rest back to the queue.
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
from imagegen.jobs.signals import JobSignals
from imagegen.repositories.generations import GenerationRepository

log = logging.getLogger(__name__)

#: Seconds between refreshes of the queue-depth gauge's reading.
STATS_INTERVAL = 5.0

JobExecutor = Callable[[Generation, str], Coroutine[Any, Any, None]]


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
        poll_interval: float = 1.0,
        worker_id: str | None = None,
    ) -> None:
        self._generations = generations
        self._execute = execute
        self._signals = signals
        self._workers = workers
        self._lease = lease
        self._poll_interval = poll_interval
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: (queued jobs, age of the oldest in seconds), refreshed by the claim loop
        self.queue_stats: tuple[int, float] = (0, 0.0)
        self._stats_read_at = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._claiming = True

    @property
    def running_jobs(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._claim_loop(), name="imagegen-claim-loop")

    async def stop(self, grace: float) -> None:
        """Stop claiming; wait up to `grace` seconds for running jobs; hand back the rest."""
        self._claiming = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        pending = list(self._tasks.values())
        if pending:
            _done, still_running = await asyncio.wait(pending, timeout=max(grace, 0))
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.gather(*still_running, return_exceptions=True)

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
            with self._signals.watch_queue() as queued:
                free = self._workers - len(self._tasks)
                if free > 0:
                    try:
                        jobs = await self._generations.claim(self.worker_id, self._lease, free)
                    except Exception:
                        log.exception("claiming jobs failed; retrying")
                        jobs = []
                    for job in jobs:
                        self._spawn(job)
                    if jobs:
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queued.wait(), timeout=self._poll_interval)

    def _spawn(self, job: Generation) -> None:
        task = asyncio.create_task(
            self._run(job), name=f"imagegen-job-{job.id}", context=_job_context(job)
        )
        self._tasks[job.id] = task

        def _done(_t: asyncio.Task[None]) -> None:
            self._tasks.pop(job.id, None)
            # A slot is free: look for more work.
            self._signals.job_queued()

        task.add_done_callback(_done)

    async def _run(self, job: Generation) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job.id), name=f"imagegen-lease-{job.id}")
        work = asyncio.create_task(
            self._execute(job, self.worker_id), name=f"imagegen-run-{job.id}"
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


def _job_context(job: Generation) -> contextvars.Context:
    """A copy of the current context in which the submitting request's trace is current,
    so everything the job does (its log lines, its spans, its lease heartbeats) joins the
    caller's trace. The token is never detached: the context dies with the job's task."""
    context = contextvars.copy_context()
    context.run(otel_context.attach, propagate.extract(job.trace_context))
    return context
