"""The webhook worker: every replica runs one. It claims due callbacks from the outbox
(FOR UPDATE SKIP LOCKED, so one replica makes each attempt), runs each attempt (through
services/webhooks/delivery.py, passed in as `deliver`) and looks again every
`poll_interval` seconds: a callback is due when its job ends or its retry delay passes,
both of which only the clock and the table know.

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
        poll_interval: float = 1.0,
        worker_id: str | None = None,
    ) -> None:
        self._outbox = outbox
        self._deliver = deliver
        self._concurrency = concurrency
        self._lease = lease
        self._poll_interval = poll_interval
        self.worker_id = worker_id or f"webhooks-{uuid.uuid4().hex[:12]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
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
        while True:
            # Cleared before the slots are counted: a slot freed from now on wakes the wait.
            self._slot_freed.clear()
            free = self._concurrency - len(self._tasks)
            if free <= 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), timeout=self._poll_interval)
                continue
            claimed: list[ClaimedWebhook] = []
            try:
                claimed = await self._outbox.claim(self.worker_id, self._lease, free)
            except Exception:
                log.exception("claiming webhooks failed; retrying")
            for webhook in claimed:
                self._spawn(webhook)
            if len(claimed) < free:
                # Nothing more is due now; a callback becomes due when a job ends or a
                # retry delay passes, which only the table and the clock know.
                await asyncio.sleep(self._poll_interval)

    def _spawn(self, webhook: ClaimedWebhook) -> None:
        task = asyncio.create_task(
            self._run(webhook), name=f"imagegen-webhook-{webhook.webhook_id}"
        )
        self._tasks[webhook.webhook_id] = task

        def _done(_t: asyncio.Task[None]) -> None:
            self._tasks.pop(webhook.webhook_id, None)
            self._slot_freed.set()

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
