"""The generation use cases, one module each. A job from submit to its terminal event:

- submission.py  SubmitGeneration / GenerateImage / RerunGeneration / QuoteGeneration /
                 UpscaleImage: validate, decide plan limits and credits, insert the job
                 QUEUED with its reservation and QUEUED event (one unit of work), notify
                 workers.
- jobs/runner.py a worker on any replica claims the job (FOR UPDATE SKIP LOCKED) and
                 holds its lease while it runs.
- pipeline.py    what the worker runs: STARTED, provider calls (PROGRESS, fallback,
                 cancel), reply check and conversion, blob + IMAGE_READY, then the
                 terminal event with settlement and usage record (one unit of work).
- watch.py       WatchGeneration / GenerateImage's stream: the job's event log from any
                 sequence number, woken by LISTEN/NOTIFY, until the terminal event.
- reads.py       GetGeneration, ListGenerations, CancelGeneration, each with the job's
                 images and full spec (GenerationPresenter, also for a retried submit).
- wait.py        WaitGeneration: a unary wait for the terminal event, through the watch.
- batches.py     BatchGenerate: many specs, each its own job, accepted or refused whole
                 (one unit of work); the jobs start within the plan's concurrency.
- user_settings.py  a user's default provider, and ListProviders (catalogue.py holds
                 the providers, the deployment's default and the fallback chain).

Policy lives in domain/ (limits.py, credits.py, validation.py, pricing.py); SQL in
repositories/, reached through the Database and UnitOfWork ports of
services/unit_of_work.py.
"""

from imagegen.services.generations.batches import BatchItem, BatchService, SubmittedBatch
from imagegen.services.generations.catalogue import ProviderCatalogue
from imagegen.services.generations.pipeline import (
    GenerationObserver,
    JobPipeline,
    PipelineSettings,
)
from imagegen.services.generations.reads import GenerationPresenter, GenerationReads
from imagegen.services.generations.submission import (
    Quote,
    SubmissionService,
    SubmissionSettings,
    Submitted,
)
from imagegen.services.generations.user_settings import UserSettingsService
from imagegen.services.generations.wait import GenerationWaiter, WaitSettings
from imagegen.services.generations.watch import GenerationWatch

__all__ = [
    "BatchItem",
    "BatchService",
    "GenerationObserver",
    "GenerationPresenter",
    "GenerationReads",
    "GenerationWaiter",
    "GenerationWatch",
    "JobPipeline",
    "PipelineSettings",
    "ProviderCatalogue",
    "Quote",
    "SubmissionService",
    "SubmissionSettings",
    "Submitted",
    "SubmittedBatch",
    "UserSettingsService",
    "WaitSettings",
]
