"""The webhook worker: every replica runs one. It claims due callbacks from the outbox
(FOR UPDATE SKIP LOCKED, so one replica makes each attempt) and runs each attempt
(through services/webhooks/delivery.py, passed in as `deliver`).

It looks again when a callback can have become due, never on a timer alone: when one is
queued or a claim is given back (a NOTIFY, through JobSignals.watch_webhooks), and when
the earliest pending callback's time comes (a retry's delay, or a claim whose lease runs
out; the outbox says when). `poll_interval` is only the safety net for a NOTIFY that
never came (the listener reconnecting wakes it too); without signals, it is the poll.

A claim holds its row for `lease`; a replica that dies mid-attempt leaves the row due
again when the lease runs out, and another replica sends it with the same webhook-id. On
shutdown the worker stops claiming, lets attempts in flight finish within the grace
period and gives back the claims of those it had to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from imagegen.jobs.signals import JobSignals
from imagegen.jobs.tasks import finish_within, stop_loop
from imagegen.repositories.webhooks import ClaimedWebhook, WebhookOutbox

log = logging.getLogger(__name__)

Deliver = Callable[[ClaimedWebhook], Awaitable[object]]


class WebhookWorker:
    """Owns the claim loop and every attempt task it starts."""

    def __init__(
        self,
        outbox: WebhookOutbox,
        deliver: Deliver,
        *,
        concurrency: int,
        lease: timedelta,
        poll_interval: float = 30.0,
        signals: JobSignals | None = None,
        worker_id: str | None = None,
    ) -> None:
        self._outbox = outbox
        self._deliver = deliver
        self._concurrency = concurrency
        self._lease = lease
        self._poll_interval = poll_interval
        self._signals = signals
        self.worker_id = worker_id or f"webhooks-{uuid.uuid4().hex[:12]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start claiming."""
        self._loop_task = asyncio.create_task(self._claim_loop(), name="imagegen-webhooks")

    async def stop(self, grace: float) -> None:
        """Stop claiming; wait up to `grace` seconds for attempts in flight, then stop the
        rest and give their claims back."""
        await stop_loop(self._loop_task)
        self._loop_task = None
        await finish_within(self._tasks.values(), grace)

    async def _claim_loop(self) -> None:
        with contextlib.ExitStack() as stack:
            if self._signals is not None:
                stack.enter_context(self._signals.watch_webhooks(self._wake))
            while True:
                # Cleared before the slots are counted and before the claim: an attempt
                # that ends (its retry may now be the next due) or a callback queued from
                # now on wakes the waits below.
                self._wake.clear()
                free = self._concurrency - len(self._tasks)
                if free <= 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._poll_interval):
                            await self._wake.wait()
                    continue
                claimed: list[ClaimedWebhook] = []
                try:
                    claimed = await self._outbox.claim(self.worker_id, self._lease, free)
                except Exception:
                    log.exception("claiming webhooks failed; retrying")
                for webhook in claimed:
                    self._spawn(webhook)
                if len(claimed) < free:
                    # Nothing more is due now: wait for a NOTIFY, or for the next
                    # callback's time, or (the safety net) the poll interval.
                    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel
                    # (the worker's stop) that lands as the event is set.
                    idle = await self._idle_for()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(idle):
                            await self._wake.wait()

    async def _idle_for(self) -> float:
        """How long nothing can fall due without a NOTIFY: until the earliest pending
        callback's time, at most the poll interval."""
        try:
            due_in = await self._outbox.next_due_in()
        except Exception:
            log.exception("reading when the next webhook is due failed")
            return self._poll_interval
        if due_in is None:
            return self._poll_interval
        # A little after the row's time, so the claim's now() has passed it (and not a
        # spin while another replica's claim of a due row is still in flight).
        return min(self._poll_interval, due_in + 0.05)

    def _spawn(self, webhook: ClaimedWebhook) -> None:
        task = asyncio.create_task(
            self._run(webhook), name=f"imagegen-webhook-{webhook.webhook_id}"
        )
        self._tasks[webhook.webhook_id] = task

        def _done(_t: asyncio.Task[None]) -> None:
            self._tasks.pop(webhook.webhook_id, None)
            self._wake.set()

        task.add_done_callback(_done)

    async def _run(self, webhook: ClaimedWebhook) -> None:
        try:
            await self._deliver(webhook)
        except asyncio.CancelledError:
            # Shutdown: the attempt did not finish; due again at once for any replica
            # (a receiver that got it anyway sees the same webhook-id again).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._outbox.release(webhook))
            raise
        except Exception:
            # Unrecorded: the claim runs out and the callback is due again.
            log.exception("webhook %s: the attempt was not recorded", webhook.webhook_id)
