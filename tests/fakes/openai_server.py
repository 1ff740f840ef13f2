"""A local HTTP server speaking OpenAI Images' wire format: generations (JSON) and edits
(multipart: image[], mask), streamed partial images as server-sent events, and errors
as {"error": {"message", "type", "param", "code"}}.

Like the real API it refuses, with 400 invalid_value, a size gpt-image models do not
take (1024x1024, 1024x1536, 1536x1024 or auto), an unknown model or output format, a
mask without an image, a mask that is not a PNG of the first image's dimensions or is
over 4 MB. It answers at the asked size unless told another one.

async with OpenAIFake.start() as fake:
    fake.url      # base URL including /v1, for OPENAI_BASE_URL
    fake.calls    # every request received (SeenCall); `await fake.calls.wait_for(n)`
    fake.script(OpenAIReply(...))
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pybase64
from aiohttp import BodyPartReader, web
from PIL import Image

from tests.fakes import Pauses, Seen, drop_connection, encoded_image, png_bytes, serve_on_loopback

SIZES = {"1024x1024": (1024, 1024), "1024x1536": (1024, 1536), "1536x1024": (1536, 1024)}
MODELS = ("gpt-image-1", "gpt-image-1-mini")
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: The largest mask the edits endpoint takes.
MAX_MASK_BYTES = 4 * 1024 * 1024


@dataclass
class OpenAIReply:
    """One scripted answer; the default is a stream with two partials and the image."""

    status: int = 200
    error_code: str = ""
    message: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict)
    partials: int = 2
    #: width, height of the final image (default: the asked size; auto is 1024x1024)
    size: tuple[int, int] | None = None
    delay: float = 0.0
    drop: bool = False

    @classmethod
    def policy_refusal(cls) -> OpenAIReply:
        """gpt-image's refusal: 400 with code moderation_blocked."""
        return cls(
            status=400,
            error_code="moderation_blocked",
            message="Your request was rejected by the safety system.",
        )


@dataclass
class SeenCall:
    """One request as the Images API received it (JSON fields or multipart parts)."""

    path: str
    headers: dict[str, str]
    fields: dict[str, Any]
    files: dict[str, list[tuple[str, bytes, str]]]

    @property
    def is_edit(self) -> bool:
        return self.path.endswith("/edits")

    @property
    def prompt(self) -> str:
        return str(self.fields.get("prompt", ""))

    @property
    def model(self) -> str:
        return str(self.fields.get("model", ""))

    @property
    def size(self) -> str:
        return str(self.fields.get("size", ""))

    @property
    def output_format(self) -> str:
        return str(self.fields.get("output_format", "png"))

    @property
    def n(self) -> int:
        return int(self.fields.get("n", 1))

    @property
    def images(self) -> list[bytes]:
        return [data for _, data, _ in self.files.get("image[]", [])]

    @property
    def mask(self) -> bytes | None:
        masks = self.files.get("mask")
        return masks[0][1] if masks else None


def _error(status: int, message: str, code: str | None, param: str | None = None) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": code,
        }
    }
    return web.json_response(body, status=status)


def _dimensions(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return image.format or "", image.size


def _mask_problem(mask: bytes, image: bytes) -> str:
    """Why the edits endpoint would refuse this mask for this image ("" if it takes it)."""
    if len(mask) > MAX_MASK_BYTES:
        return "Invalid mask: the mask must be less than 4MB."
    try:
        mask_format, mask_size = _dimensions(mask)
        _, image_size = _dimensions(image)
    except OSError:
        return "Invalid mask: the mask must be a valid PNG image."
    if mask_format != "PNG":
        return "Invalid mask: the mask must be a valid PNG image."
    if mask_size != image_size:
        return "Invalid mask: the mask and the image must have the same dimensions."
    return ""


class OpenAIFake:
    """The fake server; see the module docstring."""

    def __init__(self) -> None:
        self.calls: Seen[SeenCall] = Seen()
        self._script: list[OpenAIReply] = []
        self.default = OpenAIReply()
        self.url = ""
        self.pauses = Pauses()

    def script(self, *replies: OpenAIReply) -> None:
        self._script.extend(replies)

    async def _read(self, request: web.Request) -> SeenCall:
        fields: dict[str, Any] = {}
        files: dict[str, list[tuple[str, bytes, str]]] = {}
        if request.content_type == "application/json":
            fields = await request.json()
        else:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                name = part.name or ""
                data = bytes(await part.read())
                if part.filename:
                    content_type = part.headers.get("Content-Type", "")
                    files.setdefault(name, []).append((part.filename, data, content_type))
                else:
                    fields[name] = data.decode()
        return SeenCall(request.path, dict(request.headers), fields, files)

    def _invalid(self, call: SeenCall) -> web.Response | None:
        """What the real API refuses before generating anything."""
        if call.size and call.size != "auto" and call.size not in SIZES:
            return _error(
                400,
                f"Invalid value: '{call.size}'. Supported values are: '1024x1024', "
                "'1024x1536', '1536x1024', and 'auto'.",
                "invalid_value",
                "size",
            )
        if call.model and call.model not in MODELS:
            message = f"The model '{call.model}' does not exist."
            return _error(400, message, "invalid_value", "model")
        if call.output_format not in FORMATS:
            return _error(400, "Invalid output_format.", "invalid_value", "output_format")
        if call.is_edit and not call.images:
            return _error(400, "Missing image.", "invalid_value", "image")
        if call.mask is not None:
            problem = _mask_problem(call.mask, call.images[0])
            if problem:
                return _error(400, problem, "invalid_value", "mask")
        if not call.prompt:
            return _error(400, "Missing prompt.", "invalid_value", "prompt")
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        call = await self._read(request)
        await self.calls.record(call)
        reply = self._script.pop(0) if self._script else self.default
        if reply.delay:
            await self.pauses.sleep(reply.delay)
        if reply.drop:
            return await drop_connection(request)
        if reply.status != 200:
            response = _error(reply.status, reply.message, reply.error_code or None)
            response.headers.update(reply.headers)
            return response
        invalid = self._invalid(call)
        if invalid is not None:
            return invalid
        width, height = reply.size or SIZES.get(call.size, (1024, 1024))
        mime_type = FORMATS[call.output_format]
        final = pybase64.b64encode(encoded_image(width, height, mime_type)).decode()
        prefix = "image_edit" if call.is_edit else "image_generation"
        stream = call.fields.get("stream") in (True, "true")
        if not stream:
            return web.json_response(
                {
                    "created": 0,
                    "data": [{"b64_json": final}],
                    "output_format": call.output_format,
                    "size": f"{width}x{height}",
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(min(reply.partials, int(call.fields.get("partial_images", 0)))):
            partial = png_bytes(64, 64, (40 * (index + 1), 80, 160))
            event = {
                "type": f"{prefix}.partial_image",
                "partial_image_index": index,
                "b64_json": pybase64.b64encode(partial).decode(),
            }
            await response.write(
                f"event: {prefix}.partial_image\ndata: {json.dumps(event)}\n\n".encode()
            )
        done = {
            "type": f"{prefix}.completed",
            "b64_json": final,
            "size": f"{width}x{height}",
            "output_format": call.output_format,
        }
        await response.write(f"event: {prefix}.completed\ndata: {json.dumps(done)}\n\n".encode())
        await response.write_eof()
        return response

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls) -> AsyncIterator[OpenAIFake]:
        fake = cls()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", fake._handle)
        app.router.add_post("/v1/images/edits", fake._handle)
        async with serve_on_loopback(app) as url:
            fake.url = url + "/v1"
            try:
                yield fake
            finally:
                fake.pauses.stop()
