"""What each tool does: arguments -> imagegen gRPC calls -> a structured result.

Every rule (validation, limits, credits, idempotency) stays in the service; this
module only translates. The one thing it adds is the bounded wait: a job tool submits,
then follows the job's event log (WatchGeneration) until it ends or the wait runs out,
reporting progress as it goes, and answers with the job as it then stands.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_args

from google.protobuf import timestamp_pb2
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent
from pydantic import BaseModel, ValidationError

from imagegen.mcp import definitions as d
from imagegen.mcp.backend import Backend, Thumbnails, ToolFailure
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    library_pb2,
    prompts_pb2,
    templates_pb2,
    usage_pb2,
)

#: Reports progress: (percent 0-100, message).
ProgressReporter = Callable[[float, str], Awaitable[None]]

_STYLE_VALUES: dict[str, common_pb2.Style.ValueType] = {
    name: common_pb2.Style.Value(f"STYLE_{name.upper()}") for name in d.STYLES
}
_STYLE_NAMES = {value: name for name, value in _STYLE_VALUES.items()}
_FORMATS = {
    "png": common_pb2.IMAGE_FORMAT_PNG,
    "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
    "webp": common_pb2.IMAGE_FORMAT_WEBP,
}
_KINDS = {
    "any": library_pb2.IMAGE_KIND_UNSPECIFIED,
    "original": library_pb2.IMAGE_KIND_ORIGINAL,
    "edit": library_pb2.IMAGE_KIND_EDIT,
    "upload": library_pb2.IMAGE_KIND_UPLOAD,
    "generated": library_pb2.IMAGE_KIND_GENERATED,
}
_ANCHORS: dict[str, common_pb2.OutpaintAnchor.ValueType] = {
    name: common_pb2.OutpaintAnchor.Value(f"OUTPAINT_ANCHOR_{name.upper()}")
    for name in get_args(d.OutpaintAnchorName)
}
_SUGGESTION_SOURCES = {
    prompts_pb2.SUGGESTION_SOURCE_HISTORY: "history",
    prompts_pb2.SUGGESTION_SOURCE_TEMPLATE: "template",
    prompts_pb2.SUGGESTION_SOURCE_PHRASE: "phrase",
}
_VARIABLE_TYPES = {
    templates_pb2.TEMPLATE_VARIABLE_TYPE_UNSPECIFIED: "string",
    templates_pb2.TEMPLATE_VARIABLE_TYPE_STRING: "string",
    templates_pb2.TEMPLATE_VARIABLE_TYPE_INTEGER: "integer",
    templates_pb2.TEMPLATE_VARIABLE_TYPE_NUMBER: "number",
    templates_pb2.TEMPLATE_VARIABLE_TYPE_BOOLEAN: "boolean",
}
STATE_NAMES = {
    generation_pb2.GENERATION_STATE_UNSPECIFIED: "queued",
    generation_pb2.GENERATION_STATE_QUEUED: "queued",
    generation_pb2.GENERATION_STATE_RUNNING: "running",
    generation_pb2.GENERATION_STATE_COMPLETED: "completed",
    generation_pb2.GENERATION_STATE_FAILED: "failed",
    generation_pb2.GENERATION_STATE_CANCELLED: "cancelled",
}
TERMINAL_STATES = frozenset(
    {
        generation_pb2.GENERATION_STATE_COMPLETED,
        generation_pb2.GENERATION_STATE_FAILED,
        generation_pb2.GENERATION_STATE_CANCELLED,
    }
)
#: Event types that end a job's stream.
TERMINAL_EVENTS = frozenset(
    {
        generation_pb2.GENERATION_EVENT_TYPE_COMPLETED,
        generation_pb2.GENERATION_EVENT_TYPE_FAILED,
        generation_pb2.GENERATION_EVENT_TYPE_CANCELLED,
    }
)
#: How long a zero wait may spend replaying a running job's log to learn its percent.
_PEEK_SECONDS = 2.0


@dataclass(frozen=True)
class McpOptions:
    """How long job tools wait, and how big their thumbnails are."""

    default_wait: float = 30.0
    max_wait: float = 55.0
    thumbnail_side: int = 256


@dataclass
class CallContext:
    """What one tool call knows about its caller."""

    token: str
    #: The request_id a job tool submits with when the arguments carry none.
    derived_request_id: str
    progress: ProgressReporter


class InvalidArguments(Exception):
    """The arguments do not match the tool's input schema; the message names the field."""


def _timestamp(value: timestamp_pb2.Timestamp, present: bool = True) -> str:
    if not present or (value.seconds == 0 and value.nanos == 0):
        return ""
    return value.ToJsonString()


def _size(text: str | None) -> common_pb2.ImageSize | None:
    if text is None:
        return None
    width, height = (int(part) for part in text.split("x"))
    return common_pb2.ImageSize(width=width, height=height)


def _source(reference: str) -> common_pb2.ImageSource:
    if reference.startswith("images/"):
        return common_pb2.ImageSource(image=reference)
    return common_pb2.ImageSource(uri=reference)


def _outpaint(arguments: d.OutpaintImageArguments) -> common_pb2.Outpaint:
    outpaint = common_pb2.Outpaint(
        left=arguments.left, top=arguments.top, right=arguments.right, bottom=arguments.bottom
    )
    target = _size(arguments.size)
    if target is not None:
        outpaint.target_size.CopyFrom(target)
    if arguments.anchor is not None:
        outpaint.anchor = _ANCHORS[arguments.anchor]
    return outpaint


def _style(name: str | None) -> common_pb2.Style.ValueType:
    return _STYLE_VALUES[name] if name else common_pb2.STYLE_UNSPECIFIED


def generation_output(
    generation: generation_pb2.Generation, percent: int, *, max_wait: float
) -> dict[str, Any]:
    """A job as the GenerationOut schema describes it."""
    state = generation.state
    done = state in TERMINAL_STATES
    if state == generation_pb2.GENERATION_STATE_COMPLETED:
        percent = 100
    elif state in (
        generation_pb2.GENERATION_STATE_QUEUED,
        generation_pb2.GENERATION_STATE_UNSPECIFIED,
    ):
        percent = 0
    if state == generation_pb2.GENERATION_STATE_COMPLETED:
        next_step = "Done: the images are stored in your library (see images)."
    elif state == generation_pb2.GENERATION_STATE_FAILED:
        next_step = "The job failed and its credits were refunded; " + (
            "submitting it again may work." if generation.error.retryable else "change it first."
        )
    elif state == generation_pb2.GENERATION_STATE_CANCELLED:
        next_step = "The job was cancelled; nothing was charged for images not delivered."
    else:
        next_step = (
            f"Not done yet: call get_generation with name={generation.name!r} and "
            f"wait_seconds up to {max_wait:g} to wait for it, or cancel_generation to stop it."
        )
    output: dict[str, Any] = {
        "name": generation.name,
        "state": STATE_NAMES.get(state, "queued"),
        "done": done,
        "percent": max(0, min(100, percent)),
        "images": [
            {
                "name": image.name,
                "uri": image.uri,
                "uri_expire_time": _timestamp(
                    image.uri_expire_time, image.HasField("uri_expire_time")
                ),
                "width": image.width,
                "height": image.height,
                "mime_type": image.mime_type,
                "size_bytes": image.size_bytes,
                "seed": image.seed if image.HasField("seed") else None,
            }
            for image in generation.images
        ],
        "credits": generation.credits,
        "provider": generation.provider,
        "model": generation.model,
        "request_id": generation.request_id,
        "create_time": _timestamp(generation.create_time),
        "error": None,
        "next_step": next_step,
    }
    if state == generation_pb2.GENERATION_STATE_FAILED:
        output["error"] = {
            "code": generation.error.code,
            "message": generation.error.message,
            "retryable": generation.error.retryable,
        }
    return output


def structured_result(
    structured: dict[str, Any], extra: list[ContentBlock] | None = None
) -> CallToolResult:
    """A successful result: structured content, the same as JSON text, then `extra`."""
    text = TextContent(type="text", text=json.dumps(structured, ensure_ascii=False))
    return CallToolResult(content=[text, *(extra or [])], structured_content=structured)


def error_result(failure: ToolFailure, *, request_id: str = "") -> CallToolResult:
    """A tool error that says what went wrong and whether to retry (and, for a job tool,
    with which request_id, so that the retry runs at most once)."""
    text = f"{failure.code}: {failure.message} {failure.advice()}"
    if failure.retryable and request_id:
        text += f" Pass request_id={request_id!r} so that it runs at most once."
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content={"error": failure.as_dict()},
        is_error=True,
    )


def parse_arguments(tool: d.ToolDefinition, arguments: dict[str, Any] | None) -> BaseModel:
    """Validate a call's arguments against the tool's input schema."""
    try:
        return tool.arguments.model_validate(arguments or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(arguments)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise InvalidArguments(f"invalid arguments for {tool.name}: {problems}") from None


class ToolRunner:
    """Runs the tools of `definitions.TOOLS` against a Backend."""

    def __init__(self, backend: Backend, options: McpOptions) -> None:
        self.backend = backend
        self.options = options
        self._thumbnails = Thumbnails(backend, options.thumbnail_side)

    def wait_for(self, requested: float | None) -> float:
        wait = self.options.default_wait if requested is None else requested
        return max(0.0, min(wait, self.options.max_wait))

    async def run(
        self, tool: d.ToolDefinition, arguments: BaseModel, call: CallContext
    ) -> CallToolResult:
        """Run one tool call; a refusal by the service becomes a tool error result."""
        if not tool.makes_job:
            try:
                return await self._run_simple(tool, arguments, call)
            except ToolFailure as failure:
                return error_result(failure)
        request_id = getattr(arguments, "request_id", None) or call.derived_request_id
        try:
            generation = await self.submit(tool, arguments, call)
        except ToolFailure as failure:
            # A retry must reuse the request id, or it could make a second job.
            return error_result(failure, request_id=request_id)
        wait = self.wait_for(getattr(arguments, "wait_seconds", None))
        try:
            return await self.follow(generation.name, wait, call)
        except ToolFailure as failure:
            if not failure.retryable:
                return error_result(failure)
            # The job exists and goes on (e.g. this replica is draining): answer its handle.
            return structured_result(
                generation_output(generation, 0, max_wait=self.options.max_wait)
            )

    async def _run_simple(
        self, tool: d.ToolDefinition, arguments: BaseModel, call: CallContext
    ) -> CallToolResult:
        backend = self.backend
        if isinstance(arguments, d.GetGenerationArguments):
            return await self.follow(arguments.name, self.wait_for(arguments.wait_seconds), call)
        if isinstance(arguments, d.BatchGenerateArguments):
            return await self._batch(arguments, call)
        if isinstance(arguments, d.CancelGenerationArguments):
            request = generation_pb2.CancelGenerationRequest(
                name=arguments.name, request_id=arguments.request_id or call.derived_request_id
            )
            reply = await backend.unary(backend.generations.CancelGeneration, request, call.token)
            return structured_result(
                generation_output(reply.generation, 0, max_wait=self.options.max_wait)
            )
        if isinstance(arguments, d.ListImagesArguments):
            reply = await backend.unary(
                backend.library.ListImages,
                library_pb2.ListImagesRequest(
                    page_size=arguments.page_size,
                    page_token=arguments.page_token,
                    query=arguments.query,
                    tags=arguments.tags,
                    favorites_only=arguments.favorites_only,
                    kind=_KINDS[arguments.kind],
                ),
                call.token,
            )
            return structured_result(
                {
                    "images": [
                        {
                            "name": image.name,
                            "uri": image.uri,
                            "width": image.width,
                            "height": image.height,
                            "mime_type": image.mime_type,
                            "prompt": image.prompt,
                            "title": image.title,
                            "tags": list(image.tags),
                            "favorite": image.favorite,
                            "edit": image.edit,
                            "upload": image.upload,
                            "generation": image.generation,
                            "create_time": _timestamp(image.create_time),
                        }
                        for image in reply.images
                    ],
                    "next_page_token": reply.next_page_token,
                }
            )
        if isinstance(arguments, d.ListTemplatesArguments):
            reply = await backend.unary(
                backend.templates.ListPromptTemplates,
                templates_pb2.ListPromptTemplatesRequest(
                    page_size=arguments.page_size,
                    page_token=arguments.page_token,
                    category=arguments.category,
                ),
                call.token,
            )
            return structured_result(
                {
                    "templates": [_template_output(template) for template in reply.templates],
                    "next_page_token": reply.next_page_token,
                }
            )
        if isinstance(arguments, d.QuoteGenerationArguments):
            spec = common_pb2.GenerationSpec(
                prompt=arguments.prompt,
                size=_size(arguments.size),
                count=arguments.count,
                provider=arguments.provider,
                model=arguments.model,
                sources=[_source(source) for source in arguments.sources],
                source=common_pb2.GENERATION_SOURCE_AGENT,
            )
            reply = await backend.unary(
                backend.generations.QuoteGeneration,
                generation_pb2.QuoteGenerationRequest(spec=spec),
                call.token,
            )
            return structured_result({"credits": reply.credits, "provider": reply.provider})
        if isinstance(arguments, d.SuggestPromptsArguments):
            reply = await backend.unary(
                backend.prompts.SuggestPrompts,
                prompts_pb2.SuggestPromptsRequest(
                    text=arguments.text, style=_style(arguments.style), limit=arguments.limit
                ),
                call.token,
            )
            return structured_result(
                {
                    "suggestions": [
                        {
                            "text": suggestion.text,
                            # The contract never sends another source; history is the safe
                            # reading of a value this adapter does not know yet.
                            "source": _SUGGESTION_SOURCES.get(suggestion.source, "history"),
                            "template": suggestion.template,
                            "score": suggestion.score,
                        }
                        for suggestion in reply.suggestions
                    ]
                }
            )
        if isinstance(arguments, d.EnhancePromptArguments):
            reply = await backend.unary(
                backend.prompts.EnhancePrompt,
                prompts_pb2.EnhancePromptRequest(
                    prompt=arguments.prompt,
                    style=_style(arguments.style),
                    source=common_pb2.GENERATION_SOURCE_AGENT,
                ),
                call.token,
            )
            return structured_result(
                {
                    "prompt": reply.prompt,
                    "negative_prompt": reply.negative_prompt,
                    "enhancer": reply.enhancer,
                    "credits": reply.credits,
                }
            )
        if isinstance(arguments, d.GetCreditBalanceArguments):
            reply = await backend.unary(
                backend.usage.GetCreditBalance, usage_pb2.GetCreditBalanceRequest(), call.token
            )
            balance = reply.balance
            return structured_result(
                {
                    "available_credits": balance.available_credits,
                    "reserved_credits": balance.reserved_credits,
                    "monthly_allowance_credits": balance.monthly_allowance_credits,
                    "allowance_remaining_credits": balance.allowance_remaining_credits,
                    "purchased_credits": balance.purchased_credits,
                    "plan": balance.plan,
                    "period_reset_time": _timestamp(balance.period_reset_time),
                }
            )
        raise AssertionError(f"no runner for tool {tool.name}")  # pragma: no cover

    async def _batch(
        self, arguments: d.BatchGenerateArguments, call: CallContext
    ) -> CallToolResult:
        """Submit every prompt as one batch and answer at once with the queued jobs."""
        request_id = arguments.request_id or call.derived_request_id
        specs = []
        for item in arguments.prompts:
            spec = common_pb2.GenerationSpec(
                prompt=item.prompt,
                negative_prompt=item.negative_prompt,
                style=_style(item.style),
                size=_size(item.size),
                count=item.count,
                format=_FORMATS[item.format],
                provider=item.provider,
                model=item.model,
                source=common_pb2.GENERATION_SOURCE_AGENT,
            )
            if item.seed is not None:
                spec.seed = item.seed
            specs.append(spec)
        try:
            reply = await self.backend.unary(
                self.backend.generations.BatchGenerate,
                generation_pb2.BatchGenerateRequest(specs=specs, request_id=request_id),
                call.token,
            )
        except ToolFailure as failure:
            # A retry must reuse the request id, or it could make a second batch.
            return error_result(failure, request_id=request_id)
        return structured_result(
            {
                "batch": reply.batch,
                "generations": [
                    generation_output(g, 0, max_wait=self.options.max_wait)
                    for g in reply.generations
                ],
                "next_step": (
                    "The jobs are queued and run at most your plan's concurrency at a time: "
                    "call get_generation with each name and wait_seconds up to "
                    f"{self.options.max_wait:g} to wait for it."
                ),
            }
        )

    async def submit(
        self, tool: d.ToolDefinition, arguments: BaseModel, call: CallContext
    ) -> generation_pb2.Generation:
        """Submit a job tool's job and return it as queued (or as it stands, on a retry)."""
        backend = self.backend
        request_id = getattr(arguments, "request_id", None) or call.derived_request_id
        if isinstance(arguments, d.GenerateFromTemplateArguments):
            overrides = templates_pb2.GenerationOverrides(
                negative_prompt=arguments.negative_prompt,
                style=_style(arguments.style),
                size=_size(arguments.size),
                count=arguments.count,
                format=_FORMATS[arguments.format],
                provider=arguments.provider,
                model=arguments.model,
                source=common_pb2.GENERATION_SOURCE_AGENT,
                sources=[_source(source) for source in arguments.sources],
            )
            if arguments.seed is not None:
                overrides.seed = arguments.seed
            reply = await backend.unary(
                backend.templates.GenerateFromPromptTemplate,
                templates_pb2.GenerateFromPromptTemplateRequest(
                    name=arguments.template,
                    variables=arguments.variables,
                    overrides=overrides,
                    request_id=request_id,
                ),
                call.token,
            )
        elif isinstance(arguments, d.UpscaleImageArguments):
            reply = await backend.unary(
                backend.generations.UpscaleImage,
                generation_pb2.UpscaleImageRequest(
                    image=arguments.image,
                    factor=arguments.factor,
                    provider=arguments.provider,
                    upscaler=arguments.upscaler,
                    request_id=request_id,
                    source=common_pb2.GENERATION_SOURCE_AGENT,
                    format=(
                        _FORMATS[arguments.format]
                        if arguments.format
                        else common_pb2.IMAGE_FORMAT_UNSPECIFIED
                    ),
                ),
                call.token,
            )
        else:
            assert isinstance(
                arguments,
                d.GenerateImageArguments | d.EditImageArguments | d.OutpaintImageArguments,
            )
            spec = common_pb2.GenerationSpec(
                prompt=arguments.prompt,
                negative_prompt=arguments.negative_prompt,
                style=_style(arguments.style),
                # An outpaint's size is its canvas (in spec.outpaint), never spec.size.
                size=None
                if isinstance(arguments, d.OutpaintImageArguments)
                else _size(arguments.size),
                count=arguments.count,
                format=_FORMATS[arguments.format],
                provider=arguments.provider,
                model=arguments.model,
                source=common_pb2.GENERATION_SOURCE_AGENT,
            )
            if arguments.seed is not None:
                spec.seed = arguments.seed
            if isinstance(arguments, d.EditImageArguments):
                spec.sources.extend(_source(source) for source in arguments.sources)
                if arguments.mask is not None:
                    spec.mask.CopyFrom(_source(arguments.mask))
            if isinstance(arguments, d.OutpaintImageArguments):
                spec.sources.append(_source(arguments.source))
                spec.outpaint.CopyFrom(_outpaint(arguments))
            reply = await backend.unary(
                backend.generations.SubmitGeneration,
                generation_pb2.SubmitGenerationRequest(spec=spec, request_id=request_id),
                call.token,
            )
        generation: generation_pb2.Generation = reply.generation
        return generation

    async def follow(self, name: str, wait: float, call: CallContext) -> CallToolResult:
        """Wait up to `wait` seconds for a job to end, then answer with it as it stands."""
        generation, percent = await self.observe(name, wait, call.token, call.progress)
        return await self.answer(generation, percent, call.token)

    async def answer(
        self, generation: generation_pb2.Generation, percent: int, token: str
    ) -> CallToolResult:
        """The tool result for a job as `observe` read it (with thumbnails once it has
        completed), without reading it again."""
        output = generation_output(generation, percent, max_wait=self.options.max_wait)
        extra: list[ContentBlock] = []
        if generation.state == generation_pb2.GENERATION_STATE_COMPLETED:
            live = [image.name for image in generation.images if image.uri]
            for data in await self._thumbnails.of(live, token):
                extra.append(
                    ImageContent(
                        type="image",
                        data=base64.b64encode(data).decode("ascii"),
                        mime_type="image/webp",
                    )
                )
        return structured_result(output, extra)

    async def observe(
        self, name: str, wait: float, token: str, progress: ProgressReporter | None
    ) -> tuple[generation_pb2.Generation, int]:
        """A job after following its event log for at most `wait` seconds, and its percent.

        The log is replayed from the start, so the percent is right for a job that was
        submitted long ago, on another replica, or before a restart. A watch that ends
        early (this replica drains, the job's replica went away) is not an error: the
        job is answered as it stands and the caller resumes later.
        """
        generation = await self.backend.get_generation(name, token)
        if generation.state in TERMINAL_STATES:
            return (
                generation,
                100 if generation.state == generation_pb2.GENERATION_STATE_COMPLETED else 0,
            )
        percent = 0
        # With no wait, replay only up to the events stored now, to learn the percent.
        stop_at = generation.last_sequence if wait <= 0 else None
        budget = wait if wait > 0 else _PEEK_SECONDS
        ended = False
        try:
            async with asyncio.timeout(budget):
                async for event in self.backend.watch(
                    name, token, after_sequence=0, deadline_seconds=budget + 5
                ):
                    if (
                        event.type == generation_pb2.GENERATION_EVENT_TYPE_PROGRESS
                        and event.progress.percent > percent
                    ):
                        percent = event.progress.percent
                        if progress is not None:
                            await progress(percent, event.progress.stage or "working")
                    if event.type in TERMINAL_EVENTS:
                        ended = True
                        break
                    if stop_at is not None and event.sequence >= stop_at:
                        break
        except TimeoutError:
            pass
        except ToolFailure as failure:
            if not failure.retryable:
                raise
        generation = await self.backend.get_generation(name, token)
        if (
            ended
            and progress is not None
            and generation.state == generation_pb2.GENERATION_STATE_COMPLETED
        ):
            await progress(100, "completed")
        return generation, percent


def _template_output(template: templates_pb2.PromptTemplate) -> dict[str, Any]:
    return {
        "name": template.name,
        "display_name": template.display_name,
        "description": template.description,
        "prompt": template.prompt,
        "style": _STYLE_NAMES.get(template.style),
        "category": template.category,
        "variables": [
            {
                "name": variable.name,
                "type": _VARIABLE_TYPES.get(variable.type, "string"),
                "required": variable.required,
                "default_value": variable.default_value,
                "description": variable.description,
            }
            for variable in template.variables
        ],
        "shared": template.visibility == templates_pb2.TEMPLATE_VISIBILITY_SHARED,
        "usage_count": template.usage_count,
    }
