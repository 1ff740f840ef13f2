"""Queueing a job's callback, and its batch's, in the unit of work that ends the job, so
that a job (or a batch) that ended always has its callback (the outbox pattern)."""

from __future__ import annotations

from imagegen.domain.models import Generation, GenerationState
from imagegen.domain.webhooks import WebhookEventType, event_type_for, new_webhook_id
from imagegen.repositories.webhooks import NewWebhook
from imagegen.services.unit_of_work import UnitOfWork


async def queue_job_webhook(uow: UnitOfWork, job: Generation, state: GenerationState) -> None:
    """Inside the unit of work that ends `job` in `state`: its callback, if it named one,
    and, for a job of a batch, the count of the batch's unfinished jobs taken down, with
    the batch's callback (every job of it) when this was its last job and the batch named
    one. No statement for a single job without a callback. Delivered by jobs/webhooks.py
    once the unit commits.

    Called last in the unit, after the job's credits are settled: every unit that ends a
    job then locks the owner's balance row before the batch's row, so two of them never
    wait on each other in opposite orders."""
    if job.spec.callback_uri:
        await uow.webhooks.enqueue(
            NewWebhook(
                webhook_id=new_webhook_id(),
                user_id=job.user_id,
                url=job.spec.callback_uri,
                event_type=event_type_for(state).value,
                generation_id=job.id,
            )
        )
    if job.batch_id:
        batch = await uow.batches.job_ended(job.batch_id)
        if batch.last and batch.callback_uri:
            await uow.webhooks.enqueue(
                NewWebhook(
                    webhook_id=new_webhook_id(),
                    user_id=job.user_id,
                    url=batch.callback_uri,
                    event_type=WebhookEventType.BATCH_COMPLETED.value,
                    batch_id=job.batch_id,
                )
            )
