"""The MCP face's only way to the service: imagegen's gRPC API, with the caller's token.

`Backend` holds one channel to a served imagegen (the process's own gRPC port over
loopback, or IMAGEGEN_ADDR for `imagegen mcp`) and makes each call with the bearer
token of the MCP request it serves, so the service authenticates, validates, limits
and charges it like any gRPC call. `ToolFailure` is a refused call as a tool sees it:
the stable code, the sentence for people, and whether (and when) a retry may work,
read from the rich status (google.rpc ErrorInfo and RetryInfo).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from imagegen.client import CHANNEL_OPTIONS
from imagegen.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
    prompts_pb2_grpc,
    templates_pb2_grpc,
    usage_pb2_grpc,
)

log = logging.getLogger(__name__)

#: Seconds one unary call may take; waits are bounded separately by their own deadline.
CALL_TIMEOUT = 30.0
#: Largest stored image read back to make a thumbnail; far above what the service stores.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
#: Largest image decoded for a thumbnail (the service's own default pixel limit).
MAX_THUMBNAIL_SOURCE_PIXELS = 16_777_216

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


@dataclass(eq=False)
class ToolFailure(Exception):
    """A call the service refused or could not serve, as a tool error reports it."""

    code: str
    message: str
    retryable: bool
    retry_after_seconds: float | None = None
    grpc_code: str = ""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def advice(self) -> str:
        """One sentence on whether and when to retry."""
        if not self.retryable:
            return "Do not retry the same call: change the request first."
        if self.retry_after_seconds is not None:
            return f"Retry the same call after {self.retry_after_seconds:g} seconds."
        return "Retry the same call (with the same request_id) in a few seconds."

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "retry_after_seconds": self.retry_after_seconds,
        }


def failure_from_rpc(err: grpc.aio.AioRpcError) -> ToolFailure:
    """Read the rich status of a failed call: ErrorInfo's reason, RetryInfo's delay."""
    code = err.code()
    reason = code.name
    retry_after: float | None = None
    for key, value in err.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    retryable = code in _RETRYABLE_CODES or retry_after is not None
    return ToolFailure(
        code=reason,
        message=err.details() or code.name,
        retryable=retryable,
        retry_after_seconds=retry_after,
        grpc_code=code.name,
    )


class Backend:
    """gRPC stubs of the five imagegen services on one channel."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        # Typed Any: the generated stubs describe the synchronous API.
        self.generations: Any = generation_pb2_grpc.ImageGenerationServiceStub(self._channel)
        self.library: Any = library_pb2_grpc.ImageLibraryServiceStub(self._channel)
        self.templates: Any = templates_pb2_grpc.PromptTemplateServiceStub(self._channel)
        self.usage: Any = usage_pb2_grpc.UsageServiceStub(self._channel)
        self.prompts: Any = prompts_pb2_grpc.PromptAssistantServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    @staticmethod
    def metadata(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def unary(self, method: Any, request: Any, token: str) -> Any:
        """One unary call with the caller's token; a refusal raises ToolFailure."""
        try:
            return await method(request, metadata=self.metadata(token), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise failure_from_rpc(err) from None

    async def get_generation(self, name: str, token: str) -> generation_pb2.Generation:
        reply = await self.unary(
            self.generations.GetGeneration, generation_pb2.GetGenerationRequest(name=name), token
        )
        generation: generation_pb2.Generation = reply.generation
        return generation

    async def watch(
        self, name: str, token: str, *, after_sequence: int, deadline_seconds: float
    ) -> AsyncIterator[generation_pb2.GenerationEvent]:
        """A job's events after `after_sequence`; the caller bounds it and may stop early."""
        call = self.generations.WatchGeneration(
            generation_pb2.WatchGenerationRequest(name=name, after_sequence=after_sequence),
            metadata=self.metadata(token),
            timeout=deadline_seconds,
        )
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as err:
            raise failure_from_rpc(err) from None
        finally:
            call.cancel()

    async def download(self, image: str, token: str) -> bytes:
        """An image's stored bytes (DownloadImage), refused past MAX_DOWNLOAD_BYTES."""
        call = self.library.DownloadImage(
            library_pb2.DownloadImageRequest(name=image),
            metadata=self.metadata(token),
            timeout=CALL_TIMEOUT,
        )
        chunks: list[bytes] = []
        size = 0
        try:
            async for response in call:
                size += len(response.data)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ToolFailure("IMG_007", f"{image} is too large for a thumbnail", False)
                chunks.append(response.data)
        except grpc.aio.AioRpcError as err:
            raise failure_from_rpc(err) from None
        finally:
            call.cancel()
        return b"".join(chunks)


def make_thumbnail(data: bytes, longest_side: int) -> bytes:
    """A small WebP of an image (at most `longest_side` pixels on its longer side).

    Runs in a thread: decoding and encoding must not block the event loop.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > MAX_THUMBNAIL_SOURCE_PIXELS:
            raise ValueError(f"{width}x{height} is over the thumbnail pixel limit")
        image.draft("RGB", (longest_side, longest_side))
        picture = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        picture.thumbnail((longest_side, longest_side))
        out = io.BytesIO()
        picture.save(out, format="WEBP", quality=75, method=4)
        return out.getvalue()


class Thumbnails:
    """Thumbnails of stored images, made from the image itself (never the full image),
    and the last `capacity` of them kept: an agent polling a finished job (tasks/get,
    get_generation) would otherwise download and shrink its images on every poll.

    Keeping them by image name is safe because a stored image never changes, and a
    thumbnail is only looked up for names the caller's own GetGeneration just listed.
    """

    def __init__(self, backend: Backend, longest_side: int, *, capacity: int = 256) -> None:
        self._backend = backend
        self._side = longest_side
        self._capacity = capacity
        self._kept: OrderedDict[str, bytes] = OrderedDict()

    async def of(self, images: Sequence[str], token: str) -> list[bytes]:
        """One thumbnail per image that can have one, in order. A thumbnail is a
        convenience: one that cannot be made (the image was deleted since, storage
        hiccups) is left out and logged, and the answer keeps the image's URL."""
        results: list[bytes] = []
        for image in images:
            kept = self._kept.get(image)
            if kept is not None:
                self._kept.move_to_end(image)
                results.append(kept)
                continue
            try:
                data = await self._backend.download(image, token)
                thumbnail = await asyncio.to_thread(make_thumbnail, data, self._side)
            except (ToolFailure, OSError, ValueError, Image.DecompressionBombError) as exc:
                log.warning(
                    "no thumbnail for %s: %s", image, exc, extra={"event": "mcp.thumbnail"}
                )
                continue
            self._kept[image] = thumbnail
            while len(self._kept) > self._capacity:
                self._kept.popitem(last=False)
            results.append(thumbnail)
        return results
