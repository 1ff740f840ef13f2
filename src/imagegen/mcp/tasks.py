"""The MCP Tasks extension (`io.modelcontextprotocol/tasks`, protocol 2026-07-28) on our jobs.

The SDK ships the extension API (`mcp.server.extension`) but no task runtime, and
needs none here: a generation job already is a durable task. So a task IS the job:
its id is the generation name, `tasks/get` is GetGeneration (answered by any replica,
after any restart, for as long as the job is kept), `tasks/cancel` is
CancelGeneration, and `notifications/tasks` on a `subscriptions/listen` stream follow
the job's event log (WatchGeneration). Nothing is kept in this process.

Mapping of job states to task statuses (the extension's rule: `failed` is only for
JSON-RPC errors, a tool-level failure is a `completed` task whose result has
`isError`): QUEUED and RUNNING -> working; COMPLETED -> completed with the
get_generation result (URLs, thumbnails); FAILED -> completed with an isError result
that carries the IMG code; CANCELLED -> cancelled. Jobs never ask for input, so no
task is ever `input_required` and `tasks/update` only acknowledges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    CallToolRequestParams,
    CallToolResult,
    RequestParams,
    SubscriptionsAcknowledgedNotificationParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, Field

from imagegen.mcp.backend import ToolFailure
from imagegen.mcp.tools import TERMINAL_EVENTS, TERMINAL_STATES, ToolRunner
from imagegen.v1 import generation_pb2

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
#: Suggested polling interval; jobs take seconds, and each poll is one GetGeneration.
POLL_INTERVAL_MS = 1000
_SUBSCRIPTION_ID_META_KEY = "io.modelcontextprotocol/subscriptionId"
#: Most tasks one listen stream follows (each is one WatchGeneration stream).
MAX_TASKS_PER_LISTEN = 16
#: Longest one listen stream follows its tasks before it ends (the client listens again).
LISTEN_SECONDS = 3600.0


class TaskIdParams(RequestParams):
    """Params of tasks/get and tasks/cancel."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    task_id: str = Field(alias="taskId", min_length=1, max_length=200)


class TaskUpdateParams(TaskIdParams):
    """Params of tasks/update."""

    input_responses: dict[str, Any] = Field(default_factory=dict, alias="inputResponses")


class _Notification(BaseModel):
    """A server notification the SDK has no model for (`notifications/tasks`)."""

    method: str
    params: dict[str, Any]


#: Turns a tools/call into a submitted job, or None when the tool makes no job.
TaskSubmitter = Callable[
    [ServerRequestContext[Any, Any], CallToolRequestParams],
    Awaitable[generation_pb2.Generation | CallToolResult | None],
]
#: The caller's bearer token for a request.
TokenOf = Callable[[ServerRequestContext[Any, Any]], str]


def client_declares_tasks(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request's client declared the extension (on a 2026-07-28 wire)."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return bool(
        capabilities and capabilities.extensions and TASKS_EXTENSION in capabilities.extensions
    )


def _require_tasks(ctx: ServerRequestContext[Any, Any]) -> None:
    if not client_declares_tasks(ctx):
        raise MCPError(
            code=MISSING_REQUIRED_CLIENT_CAPABILITY,
            message="Missing required client capability",
            data={"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}},
        )


def _task_error(failure: ToolFailure) -> MCPError:
    if failure.grpc_code in ("NOT_FOUND", "INVALID_ARGUMENT"):
        return MCPError(INVALID_PARAMS, f"Failed to retrieve task: {failure.message}")
    return MCPError(INTERNAL_ERROR, f"{failure.code}: {failure.message}")


def task_of(generation: generation_pb2.Generation, percent: int = 0) -> dict[str, Any]:
    """The extension's Task fields for a job (without a result)."""
    state = generation.state
    if state == generation_pb2.GENERATION_STATE_CANCELLED:
        status, message = "cancelled", "The job was cancelled."
    elif state == generation_pb2.GENERATION_STATE_COMPLETED:
        status, message = "completed", "The images are ready."
    elif state == generation_pb2.GENERATION_STATE_FAILED:
        status = "completed"
        message = f"The job failed: {generation.error.code}: {generation.error.message}"
    elif state == generation_pb2.GENERATION_STATE_RUNNING:
        status, message = "working", f"Running, {percent}% done."
    else:
        status, message = "working", "Queued, waiting for a worker."
    return {
        "taskId": generation.name,
        "status": status,
        "statusMessage": message,
        "createdAt": generation.create_time.ToJsonString(),
        "lastUpdatedAt": generation.update_time.ToJsonString(),
        "ttlMs": None,
        "pollIntervalMs": POLL_INTERVAL_MS,
    }


class TasksExtension(Extension):
    """Job tools answer task-capable clients with a task whose id is the generation name."""

    identifier = TASKS_EXTENSION

    def __init__(self, runner: ToolRunner, submit: TaskSubmitter, token_of: TokenOf) -> None:
        self._runner = runner
        self._submit = submit
        self._token_of = token_of

    def methods(self) -> Sequence[MethodBinding]:
        modern = frozenset(MODERN_PROTOCOL_VERSIONS)
        return (
            MethodBinding("tasks/get", TaskIdParams, self._get, protocol_versions=modern),
            MethodBinding("tasks/update", TaskUpdateParams, self._update, protocol_versions=modern),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel, protocol_versions=modern),
        )

    async def intercept_tool_call(
        self,
        params: CallToolRequestParams,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        if not client_declares_tasks(ctx):
            return await call_next(ctx)
        submitted = await self._submit(ctx, params)
        if submitted is None:
            return await call_next(ctx)
        if isinstance(submitted, CallToolResult):
            return submitted  # refused before a job existed: an ordinary tool error
        # The job is durable once SubmitGeneration answered, so tasks/get resolves at once.
        return {"resultType": "task", **task_of(submitted)}

    async def detailed_task(self, name: str, token: str) -> dict[str, Any]:
        """tasks/get's answer: the task, with the tool result once the job ended."""
        try:
            generation, percent = await self._runner.observe(name, 0, token, None)
            task = task_of(generation, percent)
            if generation.state in TERMINAL_STATES and task["status"] == "completed":
                result = await self._runner.answer(generation, percent, token)
                task["result"] = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        except ToolFailure as failure:
            raise _task_error(failure) from None
        return task

    async def _get(
        self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams
    ) -> HandlerResult:
        _require_tasks(ctx)
        return {
            "resultType": "complete",
            **await self.detailed_task(params.task_id, self._token_of(ctx)),
        }

    async def _update(
        self, ctx: ServerRequestContext[Any, Any], params: TaskUpdateParams
    ) -> HandlerResult:
        # Jobs never ask for input: every response is for a key never issued, which the
        # extension says to ignore. The task must still be the caller's.
        _require_tasks(ctx)
        try:
            await self._runner.backend.get_generation(params.task_id, self._token_of(ctx))
        except ToolFailure as failure:
            raise _task_error(failure) from None
        return {"resultType": "complete"}

    async def _cancel(
        self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams
    ) -> HandlerResult:
        _require_tasks(ctx)
        backend = self._runner.backend
        try:
            await backend.unary(
                backend.generations.CancelGeneration,
                generation_pb2.CancelGenerationRequest(name=params.task_id),
                self._token_of(ctx),
            )
        except ToolFailure as failure:
            raise _task_error(failure) from None
        return {"resultType": "complete"}

    async def listen(
        self, ctx: ServerRequestContext[Any, Any], params: SubscriptionsListenRequestParams
    ) -> SubscriptionsListenResult:
        """`subscriptions/listen` for `taskIds`: a `notifications/tasks` per status change.

        Only task notifications are offered (this server's lists never change); the
        stream ends once every task it follows has ended.
        """
        subscription_id = ctx.request_id
        if subscription_id is None:
            raise MCPError(INVALID_PARAMS, "subscriptions/listen requires a request id")
        extra = params.notifications.model_extra or {}
        raw_ids = extra.get("taskIds") or []
        if raw_ids:
            _require_tasks(ctx)
        if not isinstance(raw_ids, list) or not all(isinstance(t, str) for t in raw_ids):
            raise MCPError(INVALID_PARAMS, "taskIds must be a list of task ids")
        task_ids: list[str] = list(dict.fromkeys(raw_ids))[:MAX_TASKS_PER_LISTEN]
        token = self._token_of(ctx)
        meta = {_SUBSCRIPTION_ID_META_KEY: subscription_id}
        ack = SubscriptionsAcknowledgedNotificationParams.model_validate(
            {"notifications": {"taskIds": task_ids} if task_ids else {}, "_meta": meta}
        )
        await ctx.session.send_notification(
            _Notification(  # type: ignore[arg-type]
                method="notifications/subscriptions/acknowledged",
                params=ack.model_dump(by_alias=True, mode="json", exclude_none=True),
            ),
            related_request_id=subscription_id,
        )

        async def send(task: dict[str, Any]) -> None:
            await ctx.session.send_notification(
                _Notification(  # type: ignore[arg-type]
                    method="notifications/tasks", params={**task, "_meta": meta}
                ),
                related_request_id=subscription_id,
            )

        try:
            async with asyncio.timeout(LISTEN_SECONDS), asyncio.TaskGroup() as group:
                for task_id in task_ids:
                    group.create_task(self._follow_task(task_id, token, send))
        except TimeoutError:
            pass
        return SubscriptionsListenResult.model_validate({"_meta": meta})

    async def _follow_task(
        self, name: str, token: str, send: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        try:
            generation, percent = await self._runner.observe(name, 0, token, None)
            if generation.state in TERMINAL_STATES:
                await send(await self.detailed_task(name, token))
                return
            await send(task_of(generation, percent))
            async for event in self._runner.backend.watch(
                name,
                token,
                after_sequence=generation.last_sequence,
                deadline_seconds=LISTEN_SECONDS,
            ):
                if event.type in TERMINAL_EVENTS:
                    await send(await self.detailed_task(name, token))
                    return
                if event.type == generation_pb2.GENERATION_EVENT_TYPE_STARTED or (
                    event.type == generation_pb2.GENERATION_EVENT_TYPE_PROGRESS
                    and event.progress.percent > percent
                ):
                    percent = max(percent, event.progress.percent)
                    generation.state = generation_pb2.GENERATION_STATE_RUNNING
                    generation.update_time.CopyFrom(event.create_time)
                    await send(task_of(generation, percent))
        except (ToolFailure, MCPError):
            # A task that cannot be followed (not the caller's, gone) gets no notifications;
            # tasks/get tells the client why.
            return
