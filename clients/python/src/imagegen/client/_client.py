from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    prompts_pb2,
    prompts_pb2_grpc,
)

#: gRPC channel options for every client channel: never route through a proxy.
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)

#: Status codes after which the same call may succeed on this or another replica.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

_TERMINAL = frozenset(
    {
        generation_pb2.GENERATION_EVENT_TYPE_COMPLETED,
        generation_pb2.GENERATION_EVENT_TYPE_FAILED,
        generation_pb2.GENERATION_EVENT_TYPE_CANCELLED,
    }
)


@dataclass(frozen=True)
class GeneratedImage:
    """One finished image: where to fetch it and what it is."""

    name: str
    uri: str
    width: int
    height: int
    mime_type: str
    size_bytes: int


@dataclass
class GenerationResult:
    """How a generation ended and what it made."""

    generation: str
    state: str
    images: list[GeneratedImage] = field(default_factory=list)
    error_code: str = ""
    error_message: str = ""
    last_sequence: int = 0
    request_id: str = ""


ProgressHandler = Callable[[generation_pb2.GenerationEvent], None]

#: An image to work on: one of the caller's library images (`images/{id}`), an https or
#: `data:` URL the server fetches, or the encoded bytes (PNG, JPEG or WebP). Anything but
#: a library image is kept as the caller's upload and becomes the result's parent.
ImageArg = str | bytes

#: The prompt of an upscale job, as the server gives the jobs of UpscaleImage: every job
#: carries a prompt, and an upscale's is never read by a provider.
UPSCALE_PROMPT = "upscale"

#: A style preset by name ("cinematic", "digital_art"; "" for none) or by its enum value.
StyleArg = str | int

_SUGGESTION_SOURCES = {
    prompts_pb2.SUGGESTION_SOURCE_HISTORY: "history",
    prompts_pb2.SUGGESTION_SOURCE_TEMPLATE: "template",
    prompts_pb2.SUGGESTION_SOURCE_PHRASE: "phrase",
}


@dataclass(frozen=True)
class PromptSuggestion:
    """One completion of a caller's text, from `suggest_prompts`."""

    text: str
    #: "history" (one of the caller's own prompts), "template" or "phrase" (built in)
    source: str
    #: for a template suggestion, the template, `templates/{id}`; else ""
    template: str
    #: higher is better; comparable only within one answer
    score: float


@dataclass(frozen=True)
class EnhancedPrompt:
    """A richer prompt and a proposed negative prompt, from `enhance_prompt`."""

    prompt: str
    negative_prompt: str
    #: "local" for the built-in enhancer, else the deployment's chat model
    enhancer: str
    #: credits charged for it
    credits: int


def _enum_value(value: str | int, enum: Any, prefix: str, what: str) -> int:
    """An enum value from its lowercase name without the prefix, or as given."""
    if isinstance(value, int):
        return value
    if not value:
        return 0
    try:
        return int(enum.Value(prefix + value.upper()))
    except ValueError:
        names = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys()[1:])
        raise ValueError(f"{what} {value!r} is not known; use one of {names}") from None


def _image_source(image: ImageArg) -> common_pb2.ImageSource:
    if isinstance(image, bytes):
        return common_pb2.ImageSource(data=image)
    if image.startswith("images/"):
        return common_pb2.ImageSource(image=image)
    return common_pb2.ImageSource(uri=image)


class ImageGenClient:
    """Async client for agents and workflows.

    `generate()` submits with a request id made for the caller (so retries are never
    charged twice), watches the job, and when a replica goes away (UNAVAILABLE) watches
    again from the last sequence seen, on the next address, until the job ends or the
    deadline passes. Use as `async with ImageGenClient(["host:port", ...], token)`.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        token: str,
        *,
        timeout: float = 600.0,
        retry_delay: float = 0.2,
        max_retry_delay: float = 3.0,
    ) -> None:
        self._addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self._addresses:
            raise ValueError("at least one server address is needed")
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._current = 0
        self._channel = self._open(0)

    def _open(self, index: int) -> grpc.aio.Channel:
        self._current = index % len(self._addresses)
        return grpc.aio.insecure_channel(self._addresses[self._current], options=CHANNEL_OPTIONS)

    @property
    def prompts(self) -> Any:
        """The raw PromptAssistantService stub on the current channel."""
        return prompts_pb2_grpc.PromptAssistantServiceStub(self._channel)

    @property
    def generations(self) -> Any:
        """The raw stub on the current channel, for calls this helper does not wrap.
        (Typed Any: the generated stubs describe the synchronous API.)"""
        return generation_pb2_grpc.ImageGenerationServiceStub(self._channel)

    async def __aenter__(self) -> ImageGenClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _next_replica(self, attempt: int) -> None:
        await self._channel.close()
        delay = min(self._max_retry_delay, self._retry_delay * 2**attempt)
        await asyncio.sleep(delay * (0.5 + random.random() / 2))
        self._channel = self._open(self._current + 1)

    async def stream_generation(
        self, spec: common_pb2.GenerationSpec, *, request_id: str | None = None
    ) -> AsyncIterator[generation_pb2.GenerationEvent]:
        """GenerateImage's events as they come, on one connection; a failed job raises
        grpc.aio.AioRpcError after its FAILED event."""
        call = self.generations.GenerateImage(
            generation_pb2.GenerateImageRequest(
                spec=spec, request_id=request_id or uuid.uuid4().hex
            ),
            metadata=self._metadata,
            timeout=self._timeout,
        )
        async for response in call:
            yield response.event

    async def submit(
        self, spec: common_pb2.GenerationSpec, *, request_id: str | None = None
    ) -> generation_pb2.Generation:
        """Submit, retrying transient failures with the same request id until the deadline."""
        request = generation_pb2.SubmitGenerationRequest(
            spec=spec, request_id=request_id or uuid.uuid4().hex
        )
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            try:
                reply = await self.generations.SubmitGeneration(
                    request, metadata=self._metadata, timeout=_left(deadline)
                )
                generation: generation_pb2.Generation = reply.generation
                return generation
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or _left(deadline) <= 0:
                    raise
                await self._next_replica(attempt)
                attempt += 1

    async def batch_generate(
        self,
        specs: Sequence[common_pb2.GenerationSpec],
        *,
        request_id: str | None = None,
        callback_uri: str = "",
    ) -> generation_pb2.BatchGenerateResponse:
        """Submit several specs as one batch (BatchGenerate): each becomes its own job,
        returned in order in `.generations`, all accepted or all refused. Retries
        transient failures with the same request id (made here when none is given) until
        the deadline, so a retry never makes a second batch. `callback_uri` is told once
        when every job has ended. Follow the jobs with `wait`."""
        request = generation_pb2.BatchGenerateRequest(
            specs=list(specs), request_id=request_id or uuid.uuid4().hex, callback_uri=callback_uri
        )
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            try:
                reply: generation_pb2.BatchGenerateResponse = await self.generations.BatchGenerate(
                    request, metadata=self._metadata, timeout=_left(deadline)
                )
                return reply
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or _left(deadline) <= 0:
                    raise
                await self._next_replica(attempt)
                attempt += 1

    async def wait(
        self,
        generation: str,
        *,
        after_sequence: int = 0,
        on_event: ProgressHandler | None = None,
        deadline: float | None = None,
    ) -> GenerationResult:
        """Watch a job to its end, re-watching from the last sequence after UNAVAILABLE."""
        deadline = deadline if deadline is not None else time.monotonic() + self._timeout
        result = GenerationResult(generation=generation, state="running")
        result.last_sequence = after_sequence
        attempt = 0
        while True:
            try:
                call = self.generations.WatchGeneration(
                    generation_pb2.WatchGenerationRequest(
                        name=generation, after_sequence=result.last_sequence
                    ),
                    metadata=self._metadata,
                    timeout=_left(deadline),
                )
                async for response in call:
                    event = response.event
                    result.last_sequence = event.sequence
                    attempt = 0
                    if on_event is not None:
                        on_event(event)
                    _apply(result, event)
                    if event.type in _TERMINAL:
                        return result
                # A watch that ends without a terminal event is a replica going away.
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE:
                    raise
            if _left(deadline) <= 0:
                raise TimeoutError(f"{generation} did not finish before the deadline")
            await self._next_replica(attempt)
            attempt += 1

    async def suggest_prompts(
        self, text: str, *, style: StyleArg = "", limit: int = 0
    ) -> list[PromptSuggestion]:
        """Ranked completions of `text` (best first, at most `limit`; 0 for 10) from the
        caller's own prompts, the templates they can see and built-in phrases. A read:
        after UNAVAILABLE it is asked again on the next address, within the client's
        timeout. Raises ValueError for an unknown style name, grpc.aio.AioRpcError
        (IMG_003) for a text over 4000 characters or a limit outside 0 to 50."""
        request = prompts_pb2.SuggestPromptsRequest(
            text=text,
            style=_enum_value(style, common_pb2.Style, "STYLE_", "style"),  # type: ignore[arg-type]
            limit=limit,
        )
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            try:
                reply = await self.prompts.SuggestPrompts(
                    request, metadata=self._metadata, timeout=_left(deadline)
                )
                break
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or _left(deadline) <= 0:
                    raise
                await self._next_replica(attempt)
                attempt += 1
        return [
            PromptSuggestion(
                text=s.text,
                source=_SUGGESTION_SOURCES.get(s.source, "unspecified"),
                template=s.template,
                score=s.score,
            )
            for s in reply.suggestions
        ]

    async def enhance_prompt(
        self, prompt: str, *, style: StyleArg = "", source: str | int = ""
    ) -> EnhancedPrompt:
        """A richer version of `prompt` for `style`, and a negative prompt, from the
        deployment's chat model or its local enhancer; `source` ("api", "ui", "workflow",
        "agent") is recorded with its usage. Asked once (it may be charged): errors are
        grpc.aio.AioRpcError, IMG_003 for an empty or over-long prompt, IMG_002
        (UNAVAILABLE) when the chat model fails, IMG_011 when moderation blocks it."""
        request = prompts_pb2.EnhancePromptRequest(
            prompt=prompt,
            style=_enum_value(style, common_pb2.Style, "STYLE_", "style"),  # type: ignore[arg-type]
            source=_enum_value(  # type: ignore[arg-type]
                source, common_pb2.GenerationSource, "GENERATION_SOURCE_", "source"
            ),
        )
        reply = await self.prompts.EnhancePrompt(
            request, metadata=self._metadata, timeout=self._timeout
        )
        return EnhancedPrompt(
            prompt=reply.prompt,
            negative_prompt=reply.negative_prompt,
            enhancer=reply.enhancer,
            credits=reply.credits,
        )

    async def outpaint(
        self,
        image: ImageArg,
        *,
        prompt: str,
        left: int = 0,
        top: int = 0,
        right: int = 0,
        bottom: int = 0,
        size: tuple[int, int] | None = None,
        anchor: str | int = "",
        provider: str = "",
        negative_prompt: str = "",
        style: StyleArg = "",
        output_format: str | int = "",
        seed: int | None = None,
        source: str | int = "",
        request_id: str | None = None,
        on_event: ProgressHandler | None = None,
    ) -> GenerationResult:
        """Extend `image` outward and wait for the result, as `generate` does. Give the
        pixels to add on each side (0 to 2048), or the canvas `size` (width, height) to
        reach and where the image sits on it (`anchor`: "center", "top", "bottom_left",
        ...; "" for the centre), not both. `prompt` says what the new area shows (`local`
        ignores it and extends the edges). The result is a new library image whose
        parent is the source, priced as an edit of its size. Raises ValueError for an
        unknown anchor, style or format name, grpc.aio.AioRpcError when refused: IMG_003
        for a wrong form or a provider that cannot outpaint, IMG_007 past the pixel
        limit."""
        outpaint = common_pb2.Outpaint(left=left, top=top, right=right, bottom=bottom)
        if size is not None:
            outpaint.target_size.CopyFrom(common_pb2.ImageSize(width=size[0], height=size[1]))
        outpaint.anchor = _enum_value(  # type: ignore[assignment]
            anchor, common_pb2.OutpaintAnchor, "OUTPAINT_ANCHOR_", "anchor"
        )
        spec = common_pb2.GenerationSpec(
            prompt=prompt,
            negative_prompt=negative_prompt,
            style=_enum_value(style, common_pb2.Style, "STYLE_", "style"),  # type: ignore[arg-type]
            format=_enum_value(  # type: ignore[arg-type]
                output_format, common_pb2.ImageFormat, "IMAGE_FORMAT_", "format"
            ),
            provider=provider,
            source=_enum_value(  # type: ignore[arg-type]
                source, common_pb2.GenerationSource, "GENERATION_SOURCE_", "source"
            ),
            sources=[_image_source(image)],
            outpaint=outpaint,
        )
        if seed is not None:
            spec.seed = seed
        return await self.generate(spec, request_id=request_id, on_event=on_event)

    async def upscale(
        self,
        image: ImageArg,
        *,
        factor: int = 2,
        upscaler: str = "",
        provider: str = "",
        output_format: str | int = "",
        source: str | int = "",
        request_id: str | None = None,
        on_event: ProgressHandler | None = None,
    ) -> GenerationResult:
        """Enlarge `image` by `factor` (2 or 4) and wait for the result, as `generate`
        does: a library image through UpscaleImage, other images (bytes, a URL) as a
        generation whose spec upscales them (they are kept as uploads first). `upscaler`
        is one of the provider's (ListProviders), "" for its default; `output_format`
        "" keeps a library image's format (PNG for others). The result is a new library
        image of exactly factor times the size, whose parent is the source. Raises
        ValueError for an unknown format name, grpc.aio.AioRpcError when refused:
        NOT_FOUND for another user's image, IMG_003 for another factor, an unknown
        upscaler or a provider that cannot upscale, IMG_007 past the pixel limit."""
        request_id = request_id or uuid.uuid4().hex
        deadline = time.monotonic() + self._timeout
        image_format = _enum_value(output_format, common_pb2.ImageFormat, "IMAGE_FORMAT_", "format")
        caller_source = _enum_value(
            source, common_pb2.GenerationSource, "GENERATION_SOURCE_", "source"
        )
        if isinstance(image, str) and image.startswith("images/"):
            request = generation_pb2.UpscaleImageRequest(
                image=image,
                factor=factor,
                provider=provider,
                upscaler=upscaler,
                request_id=request_id,
                source=caller_source,  # type: ignore[arg-type]
                format=image_format,  # type: ignore[arg-type]
            )
            generation = await self._upscale_image(request, deadline)
        else:
            spec = common_pb2.GenerationSpec(
                prompt=UPSCALE_PROMPT,
                provider=provider,
                format=image_format,  # type: ignore[arg-type]
                source=caller_source,  # type: ignore[arg-type]
                sources=[_image_source(image)],
                upscale=common_pb2.Upscale(factor=factor, upscaler=upscaler),
            )
            generation = await self.submit(spec, request_id=request_id)
        result = await self.wait(generation.name, on_event=on_event, deadline=deadline)
        result.request_id = request_id
        return result

    async def _upscale_image(
        self, request: generation_pb2.UpscaleImageRequest, deadline: float
    ) -> generation_pb2.Generation:
        """UpscaleImage, retried with the same request id after UNAVAILABLE."""
        attempt = 0
        while True:
            try:
                reply = await self.generations.UpscaleImage(
                    request, metadata=self._metadata, timeout=_left(deadline)
                )
                generation: generation_pb2.Generation = reply.generation
                return generation
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or _left(deadline) <= 0:
                    raise
                await self._next_replica(attempt)
                attempt += 1

    async def generate(
        self,
        spec: common_pb2.GenerationSpec,
        *,
        request_id: str | None = None,
        on_event: ProgressHandler | None = None,
    ) -> GenerationResult:
        """Generate and wait for the end, surviving replica restarts; returns the result
        (a failed or cancelled job too). Raises TimeoutError after the client's timeout."""
        request_id = request_id or uuid.uuid4().hex
        deadline = time.monotonic() + self._timeout
        generation = await self.submit(spec, request_id=request_id)
        result = await self.wait(generation.name, on_event=on_event, deadline=deadline)
        result.request_id = request_id
        return result


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _apply(result: GenerationResult, event: generation_pb2.GenerationEvent) -> None:
    kind = event.type
    if kind == generation_pb2.GENERATION_EVENT_TYPE_IMAGE_READY:
        image = event.image
        result.images.append(
            GeneratedImage(
                name=image.name,
                uri=image.uri,
                width=image.width,
                height=image.height,
                mime_type=image.mime_type,
                size_bytes=image.size_bytes,
            )
        )
    elif kind == generation_pb2.GENERATION_EVENT_TYPE_COMPLETED:
        result.state = "completed"
    elif kind == generation_pb2.GENERATION_EVENT_TYPE_CANCELLED:
        result.state = "cancelled"
    elif kind == generation_pb2.GENERATION_EVENT_TYPE_FAILED:
        result.state = "failed"
        result.error_code = event.error.code
        result.error_message = event.error.message
