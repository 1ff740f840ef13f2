"""Callbacks: the URL's check at submit, and one delivery attempt.

An attempt, top to bottom (jobs/webhooks.py claims the row and calls `deliver`):
1. The body: `{"type", "timestamp", "data"}` where `data` holds the Generation as the API
   shows it (proto JSON, fresh image URLs, the attempts so far) or, for a batch, all of
   its jobs. Rendering is the API's business (api/webhooks.py), handed in as `render`.
2. The Standard Webhooks headers, signed by the owner's current secret and, during a
   rotation's grace period, the previous one too (domain/webhooks.py).
3. The POST through the fetch guard (providers/fetch_guard.py): its allowlist applies,
   the address is vetted when it connects, no redirect is followed, the answer is read
   only up to a cap, the attempt has a deadline.
4. The attempt recorded, and what follows: a 2xx answer is delivered (never sent again);
   anything else is tried again after the retry policy's next delay, with the same
   `webhook-id`, until the attempts run out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from imagegen.domain.batches import BATCHES_PREFIX
from imagegen.domain.models import Generation, Identity
from imagegen.domain.webhooks import (
    DeliveryOutcome,
    RetryPolicy,
    WebhookEventType,
    check_callback_uri,
    shown_callback_uri,
    signed_headers,
)
from imagegen.providers.fetch_guard import PostReply
from imagegen.repositories.webhooks import ClaimedWebhook
from imagegen.services.generations.reads import GenerationReads
from imagegen.services.unit_of_work import Database
from imagegen.services.webhooks.secrets import WebhookSecrets

log = logging.getLogger(__name__)

USER_AGENT = "imagegen-webhooks/1"


@dataclass(frozen=True)
class WebhookEvent:
    """What one callback tells: a job's end, or a batch's (then every job of it)."""

    webhook_id: str
    type: WebhookEventType
    #: when the job (or the batch's last job) ended
    time: datetime
    generations: tuple[Generation, ...]
    #: `batches/{batch}` for a batch's callback; empty for a job's
    batch: str = ""


#: Turns an event into the callback's body (bytes of JSON); see api/webhooks.py.
PayloadRenderer = Callable[[WebhookEvent], bytes]


class CallbackSender(Protocol):
    """Sends callbacks through the SSRF guard (providers/fetch_guard.GuardedFetcher)."""

    async def check_destination(self, url: str, *, field: str) -> None:
        """IMG_003 naming `field` if the guard would refuse to connect to `url`."""
        ...

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PostReply:
        """POST once, within the deadline, following no redirect; never raises for the
        receiver's failures."""
        ...


class BatchJobs(Protocol):
    """The jobs of one of a user's batches, in the order they were submitted
    (services/generations/reads.py GenerationReads.batch_jobs)."""

    def __call__(self, identity: Identity, batch_id: str) -> Awaitable[Sequence[Generation]]:
        """The batch's jobs, as GetGeneration shows them."""
        ...


@dataclass(frozen=True)
class DeliverySettings:
    """When to try again, and which hosts may be reached over plain http."""

    retry: RetryPolicy
    #: IMAGEGEN_FETCH_ALLOW_HOSTS
    allow_hosts: frozenset[str]


class CallbackDelivery:
    """Checks callback URLs at submit, and makes delivery attempts."""

    def __init__(
        self,
        *,
        db: Database,
        reads: GenerationReads,
        secrets: WebhookSecrets,
        sender: CallbackSender,
        render: PayloadRenderer,
        settings: DeliverySettings,
        batch_jobs: BatchJobs | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._reads = reads
        self._secrets = secrets
        self._sender = sender
        self._render = render
        self._settings = settings
        self._batch_jobs = batch_jobs
        self._clock = clock

    async def check_callback(self, uri: str) -> None:
        """IMG_003 (on callback_uri) unless `uri` is an https URL (plain http only for
        allowlisted hosts) that the fetch guard would connect to: a loopback, private,
        link-local or metadata address is refused unless allowlisted."""
        check_callback_uri(uri, allow_hosts=self._settings.allow_hosts)
        await self._sender.check_destination(uri, field="callback_uri")

    async def deliver(self, claimed: ClaimedWebhook) -> DeliveryOutcome:
        """Make the claimed attempt and record it with what follows (see the module
        docstring). A failure to prepare the callback is a failed attempt too; only the
        database failing leaves it unrecorded (the claim then runs out and it is due
        again, with the same webhook-id)."""
        started = self._clock()
        try:
            body = self._render(await self._event(claimed))
            keys = await self._secrets.signing_keys(claimed.user_id)
            headers = {
                **signed_headers(keys, claimed.webhook_id, int(started), body),
                "content-type": "application/json",
                "user-agent": USER_AGENT,
            }
            reply = await self._sender.post(claimed.url, body, headers)
            outcome = DeliveryOutcome(reply.status, reply.error)
        except self._db.failures:
            raise
        except Exception:
            log.exception("preparing webhook %s failed", claimed.webhook_id)
            outcome = DeliveryOutcome(0, "the callback could not be prepared; it is tried again")
        retry_after = None if outcome.delivered else self._settings.retry.delay_after(
            claimed.attempt
        )
        await self._db.webhooks.record(
            claimed, datetime.fromtimestamp(started, UTC), outcome, retry_after
        )
        log.info(
            "webhook attempt",
            extra={
                "event": "webhook.attempt",
                "webhook_id": claimed.webhook_id,
                "generation_id": claimed.generation_id,
                "batch_id": claimed.batch_id,
                "user_id": claimed.user_id,
                "url": shown_callback_uri(claimed.url),
                "attempt": claimed.attempt,
                "http_status": outcome.http_status,
                "delivered": outcome.delivered,
                "error": outcome.error,
                "retry_in_s": retry_after.total_seconds() if retry_after else None,
            },
        )
        return outcome

    async def _event(self, claimed: ClaimedWebhook) -> WebhookEvent:
        owner = Identity(user_id=claimed.user_id)
        if claimed.batch_id:
            if self._batch_jobs is None:
                raise LookupError("batch callbacks need BatchGenerate's jobs")
            generations = tuple(await self._batch_jobs(owner, claimed.batch_id))
            batch = BATCHES_PREFIX + claimed.batch_id
        else:
            generations = (await self._reads.get(owner, claimed.generation_id),)
            batch = ""
        return WebhookEvent(
            webhook_id=claimed.webhook_id,
            type=WebhookEventType(claimed.event_type),
            time=claimed.event_time,
            generations=generations,
            batch=batch,
        )
