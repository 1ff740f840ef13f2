from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

#: gRPC channel options for every client channel: never route through a proxy.
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


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


ProgressHandler = Callable[[generation_pb2.GenerationEvent], None]


class ImageGenClient:
    """Async client over one channel; use as `async with ImageGenClient(addr, token)`."""

    def __init__(self, address: str, token: str, *, timeout: float = 600.0) -> None:
        self._address = address
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.generations = generation_pb2_grpc.ImageGenerationServiceStub(self._channel)

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

    async def stream_generation(
        self, spec: common_pb2.GenerationSpec, *, request_id: str | None = None
    ) -> AsyncIterator[generation_pb2.GenerationEvent]:
        """GenerateImage's events as they come; a failed job raises grpc.aio.AioRpcError
        after its FAILED event."""
        call = self.generations.GenerateImage(
            generation_pb2.GenerateImageRequest(
                spec=spec, request_id=request_id or uuid.uuid4().hex
            ),
            metadata=self._metadata,
            timeout=self._timeout,
        )
        async for response in call:
            yield response.event

    async def generate(
        self,
        spec: common_pb2.GenerationSpec,
        *,
        request_id: str | None = None,
        on_event: ProgressHandler | None = None,
    ) -> GenerationResult:
        """Generate and wait for the end; returns the result (a failed job too)."""
        result = GenerationResult(generation="", state="running")
        try:
            async for event in self.stream_generation(spec, request_id=request_id):
                result.generation = event.generation
                result.last_sequence = event.sequence
                if on_event is not None:
                    on_event(event)
                _apply(result, event)
        except grpc.aio.AioRpcError:
            if result.state != "failed":
                raise
        return result


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
