"""WaitGeneration: wait for a job to end without a stream, after
google.longrunning.Operations.WaitOperation.

The wait follows the job's event log through the watch (watch.py): it subscribes to the
job's wake-up signals before it reads, so it learns of the terminal event as soon as it is
committed on any replica, and never polls for it by itself. It answers with the job as it
stands when the job ended, when the wait's budget ran out, or when this replica starts to
drain: never with an error for a job that is merely still running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

from imagegen.domain.errors import InvalidRequest, ShuttingDown
from imagegen.domain.models import Generation, GenerationEvent, Identity
from imagegen.services.generations.reads import GenerationReads
from imagegen.services.generations.watch import GenerationWatch

#: The most time kept free before the caller's deadline, to read the job and answer.
DEADLINE_MARGIN = 0.5
#: The share of the caller's remaining time kept free when that is short.
DEADLINE_MARGIN_SHARE = 0.25


@dataclass(frozen=True)
class WaitSettings:
    """How long a wait lasts when the request names no timeout, and at most."""

    #: IMAGEGEN_WAIT_DEFAULT
    default: timedelta
    #: IMAGEGEN_WAIT_MAX
    maximum: timedelta


def wait_budget(
    requested: timedelta | None, deadline_left: float | None, settings: WaitSettings
) -> float:
    """Seconds to wait: the requested timeout (unset or zero: the default), never more
    than the maximum, and ending a little before the caller's gRPC deadline so that the
    answer arrives in time. IMG_003 for a negative timeout."""
    if requested is not None and requested < timedelta(0):
        raise InvalidRequest(
            "timeout must not be negative (zero or unset waits the default "
            f"{settings.default.total_seconds():g}s)",
            field="timeout",
        )
    wanted = requested or settings.default
    budget = min(wanted, settings.maximum).total_seconds()
    if deadline_left is not None:
        margin = min(DEADLINE_MARGIN, max(deadline_left, 0.0) * DEADLINE_MARGIN_SHARE)
        budget = min(budget, deadline_left - margin)
    return max(budget, 0.0)


class GenerationWaiter:
    """Waits, bounded, for one of the caller's jobs to end; anyone else's is NotFound."""

    def __init__(
        self, *, reads: GenerationReads, watch: GenerationWatch, settings: WaitSettings
    ) -> None:
        self._reads = reads
        self._watch = watch
        self._settings = settings

    async def wait(
        self,
        identity: Identity,
        generation_id: str,
        timeout: timedelta | None = None,  # noqa: ASYNC109 - the request's field, a budget
        *,
        deadline_left: float | None = None,
    ) -> Generation:
        """The job once it has ended, or as it stands when the budget (see wait_budget)
        runs out; a finished job at once. `deadline_left` is the caller's remaining time
        in seconds, None without a deadline."""
        budget = wait_budget(timeout, deadline_left, self._settings)
        generation = await self._reads.get(identity, generation_id)
        if generation.state.terminal or budget <= 0:
            return generation
        # Past last_sequence the log holds only what happens from now on; the terminal
        # event is the last one a job gets.
        # watch() is an async generator: closed here, it unsubscribes at once.
        events = cast(
            AsyncGenerator[GenerationEvent, None],
            self._watch.watch(identity, generation.id, generation.last_sequence),
        )
        with contextlib.suppress(TimeoutError, ShuttingDown):
            async with contextlib.aclosing(events), asyncio.timeout(budget):
                async for event in events:
                    if event.type.terminal:
                        break
        return await self._reads.get(identity, generation.id)
