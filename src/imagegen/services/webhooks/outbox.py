"""Queueing a job's callback in the unit of work that ends the job, so that a job that
ended always has its callback (the outbox pattern)."""

from __future__ import annotations

from imagegen.domain.models import Generation, GenerationState
from imagegen.domain.webhooks import event_type_for, new_webhook_id
from imagegen.repositories.webhooks import NewWebhook
from imagegen.services.unit_of_work import UnitOfWork


async def queue_job_webhook(uow: UnitOfWork, job: Generation, state: GenerationState) -> None:
    """Inside the unit of work that ends `job` in `state`: its callback, if it named one
    (no statement otherwise). Delivered by jobs/webhooks.py once the unit commits."""
    if not job.spec.callback_uri:
        return
    await uow.webhooks.enqueue(
        NewWebhook(
            webhook_id=new_webhook_id(),
            user_id=job.user_id,
            url=job.spec.callback_uri,
            event_type=event_type_for(state).value,
            generation_id=job.id,
        )
    )
