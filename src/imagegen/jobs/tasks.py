"""Stopping a worker's tasks: what the job runner and the webhook worker share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def stop_loop(task: asyncio.Task[None] | None) -> None:
    """Cancel a worker's claim loop and wait for it to end."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def finish_within(tasks: Iterable[asyncio.Task[None]], grace: float) -> None:
    """Let running tasks finish for up to `grace` seconds, then cancel the rest and wait
    for them (each hands its work back as it is cancelled)."""
    pending = list(tasks)
    if not pending:
        return
    _done, still_running = await asyncio.wait(pending, timeout=max(grace, 0))
    for task in still_running:
        task.cancel()
    if still_running:
        await asyncio.gather(*still_running, return_exceptions=True)
