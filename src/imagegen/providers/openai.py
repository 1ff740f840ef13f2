"""`openai`: OpenAI Images (gpt-image models), generations and edits, with streamed
partial images turned into progress previews.

    POST {OPENAI_BASE_URL}/images/generations   JSON
    POST {OPENAI_BASE_URL}/images/edits         multipart: image[], mask, prompt, ...
    Authorization: Bearer {OPENAI_API_KEY}
    stream=true -> server-sent events: *.partial_image {b64_json, partial_image_index},
                   then *.completed {b64_json}

What goes out, field by field:
    model           the chosen model, or gpt-image-1
    size            the asked size when gpt-image takes it (1024x1024, 1024x1536,
                    1536x1024), else the nearest of those by shape: square for 256x256
                    and 512x512; the pipeline fits the reply to the exact asked size
    output_format   the asked format (png, jpeg, webp), so the reply can be stored as is
    n               1 (a batch is one call per image)
    prompt          with the style preset and the negative prompt folded in
                    (providers/prompting.py): the API has no field for either
    image[], mask   for edits: every source, and the mask (transparent = change), which
                    is the contract's own mask convention
The API takes no seed (capabilities.seed is false).

An outpaint is an edit of one image, the padded canvas: the source, opaque, on a
transparent canvas, and as `mask` a PNG of the same size that is transparent over the
new area and opaque over the source (the canvas's own alpha; sent apart because the
API takes a mask of at most 4 MB, which a photo's canvas can pass). gpt-image answers
only at its native sizes, so the canvas is first widened, centred, to the aspect ratio
of the native size nearest its shape (the extra border is more new area) and, when
larger than that size, scaled down to it; `size` is that native size. The pipeline
fits the reply to the outpaint's canvas by its cover-then-centre-crop rule, which
undoes exactly that widening, so the source lands where the geometry puts it (within
a pixel of rounding; gpt-image redraws the whole picture, so the source is kept
closely, not bit for bit). The API cannot upscale.

Both OPENAI_API_KEY and OPENAI_BASE_URL must be set (no default points at a public
host); for OpenAI itself the base URL is https://api.openai.com/v1.
"""

from __future__ import annotations

import asyncio
import binascii
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pybase64
from PIL import Image

from imagegen.domain.enlarge import OutpaintGeometry
from imagegen.domain.errors import ImageTooLarge, ProviderNotConfigured
from imagegen.domain.models import STANDARD_SIZES, ImageFormat, Size
from imagegen.imaging import ImageDecodeError, make_preview_from_bytes
from imagegen.providers import outpainting
from imagegen.providers.base import (
    ProgressCallback,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
    ProviderUnavailable,
    SourceImage,
    check_enlargement,
    check_model,
    first_source,
)
from imagegen.providers.http_failures import status_failure, transport_errors
from imagegen.providers.prompting import fold_prompt

#: gpt-image models: the same parameters, sizes and streamed partial images
MODELS = ("gpt-image-1", "gpt-image-1-mini")
MODEL = MODELS[0]
#: the sizes gpt-image models generate
NATIVE_SIZES = (Size(1024, 1024), Size(1024, 1536), Size(1536, 1024))
PARTIAL_IMAGES = 2
#: A multipart file: (form field, (file name, bytes, MIME type)).
_File = tuple[str, tuple[str, bytes, str]]
_POLICY_CODES = {"content_policy_violation", "moderation_blocked"}


class OpenAIProvider:
    """OpenAI Images behind the Provider protocol."""

    id = "openai"
    display_name = "OpenAI Images"
    models = MODELS
    #: the Images API has no upscaling
    upscalers: tuple[str, ...] = ()
    capabilities = ProviderCapabilities(
        edit=True,
        mask=True,
        negative_prompt=False,
        seed=False,
        style=False,
        previews=True,
        # Every standard size: the nearest native one is asked for and the pipeline fits it.
        sizes=STANDARD_SIZES,
        formats=tuple(ImageFormat),
        max_count=4,
        outpaint=True,
    )

    def __init__(
        self, base_url: str | None, api_key: str | None, client: httpx.AsyncClient
    ) -> None:
        self._base_url = (base_url or "").rstrip("/")
        self._api_key = api_key or ""
        self._client = client

    @property
    def configured(self) -> bool:
        return bool(self._base_url and self._api_key)

    def check(self, request: ProviderRequest) -> None:
        """The model must be a gpt-image model (IMG_003 naming them); sizes are checked by
        the capabilities and everything else is free text."""
        check_model(self.id, self.models, request.model)
        check_enlargement(self.id, self.capabilities, self.upscalers, request)

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """One image; partial images arrive as progress previews."""
        if not self.configured:
            raise ProviderNotConfigured(
                "the openai provider needs OPENAI_API_KEY and OPENAI_BASE_URL; "
                "set both or choose another provider"
            )
        prompt = fold_prompt(request.prompt, request.negative_prompt, request.style)
        asked = request.outpaint.canvas if request.outpaint else request.resize_to or request.size
        size = native_size(asked)
        model = request.model or MODEL
        fields: dict[str, str] = {
            "model": model,
            "prompt": prompt,
            "n": "1",
            "size": str(size),
            "output_format": request.output_format.value,
            "stream": "true",
            "partial_images": str(PARTIAL_IMAGES),
        }
        headers = {"Authorization": f"Bearer {self._api_key}"}
        await progress(0, "requesting", None)
        files: list[_File] = []
        if request.outpaint is not None:
            source = first_source(request, "an outpaint")
            files = await asyncio.to_thread(_outpaint_files, source, request.outpaint, size)
        elif request.sources:
            files = [
                ("image[]", (f"source-{i}.{_ext(s.mime_type)}", s.data, s.mime_type))
                for i, s in enumerate(request.sources)
            ]
            if request.mask is not None:
                files.append(("mask", ("mask.png", request.mask.data, request.mask.mime_type)))
        with transport_errors(provider=self.id, timeout=request.timeout):
            async with asyncio.timeout(request.timeout):
                if files:
                    call = self._client.stream(
                        "POST",
                        f"{self._base_url}/images/edits",
                        data=fields,
                        files=files,
                        headers=headers,
                        timeout=request.timeout,
                    )
                else:
                    body: dict[str, Any] = {
                        **fields,
                        "n": 1,
                        "stream": True,
                        "partial_images": PARTIAL_IMAGES,
                    }
                    call = self._client.stream(
                        "POST",
                        f"{self._base_url}/images/generations",
                        json=body,
                        headers=headers,
                        timeout=request.timeout,
                    )
                async with call as reply:
                    if reply.status_code >= 400:
                        await reply.aread()
                        _raise_for(reply)
                    return await self._read_stream(
                        reply, progress, model, request.output_format.mime_type
                    )

    async def _read_stream(
        self, reply: httpx.Response, progress: ProgressCallback, model: str, mime_type: str
    ) -> ProviderImage:
        final: bytes | None = None
        async for event in _sse_events(reply):
            kind = str(event.get("type", ""))
            if kind.endswith("partial_image"):
                partial = _b64(event.get("b64_json"))
                index = int(event.get("partial_image_index", 0))
                try:
                    preview: bytes | None = await asyncio.to_thread(
                        make_preview_from_bytes, partial
                    )
                except (ImageDecodeError, ImageTooLarge):
                    preview = None  # a broken partial costs a preview, not the image
                await progress(10 + 80 * (index + 1) // (PARTIAL_IMAGES + 1), "partial", preview)
            elif kind.endswith("completed"):
                final = _b64(event.get("b64_json"))
            elif kind == "error" or "error" in event:
                _raise_error_body(event.get("error") or event, 500)
        if final is None:
            raise ProviderUnavailable("the openai stream ended without an image", retryable=True)
        await progress(90, "received", None)
        return ProviderImage(data=final, mime_type=mime_type, model=model)


def _outpaint_files(
    source: SourceImage, geometry: OutpaintGeometry, size: Size
) -> list[_File]:
    """The padded canvas and its mask, at the shape of `size` (see the module
    docstring). Runs in a worker thread."""
    image = outpainting.decode_source(source.data, geometry)
    sent = outpainting.widened(geometry, size)
    if sent.canvas.width > size.width:
        sent = outpainting.scaled_to(sent, size)
        image = image.resize((sent.source.width, sent.source.height), Image.Resampling.LANCZOS)
    canvas = outpainting.png(outpainting.transparent_canvas(image, sent))
    mask = outpainting.png(outpainting.keep_mask(sent))
    return [
        ("image[]", ("canvas.png", canvas, "image/png")),
        ("mask", ("mask.png", mask, "image/png")),
    ]


def native_size(size: Size) -> Size:
    """The size to ask gpt-image for: `size` itself when it is native, else the native
    size nearest in shape (landscape, portrait or square)."""
    if size in NATIVE_SIZES:
        return size
    ratio = size.width / max(size.height, 1)
    if ratio >= 1.25:
        return Size(1536, 1024)
    if ratio <= 0.8:
        return Size(1024, 1536)
    return Size(1024, 1024)


async def _sse_events(reply: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    data_lines: list[str] = []
    async for line in reply.aiter_lines():
        if line.startswith("data:"):
            data_lines.append(line[5:].strip())
        elif not line.strip() and data_lines:
            payload = "\n".join(data_lines)
            data_lines = []
            if payload == "[DONE]":
                return
            try:
                yield json.loads(payload)
            except json.JSONDecodeError as exc:
                raise ProviderUnavailable("the openai stream sent an unreadable event") from exc
    if data_lines:
        try:
            yield json.loads("\n".join(data_lines))
        except json.JSONDecodeError as exc:
            raise ProviderUnavailable("the openai stream sent an unreadable event") from exc


def _b64(value: object) -> bytes:
    try:
        return pybase64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderUnavailable("the openai provider sent an image that is not base64") from exc


def _ext(mime_type: str) -> str:
    return {"image/jpeg": "jpg", "image/webp": "webp"}.get(mime_type, "png")


def _raise_for(reply: httpx.Response) -> None:
    try:
        body = reply.json()
    except (json.JSONDecodeError, ValueError):
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    _raise_error_body(error if isinstance(error, dict) else {}, reply.status_code, reply)


def _raise_error_body(
    error: dict[str, Any], status: int, reply: httpx.Response | None = None
) -> None:
    code = str(error.get("code") or "")
    failure = status_failure(
        status,
        provider="openai",
        reply=reply,
        key_setting="OPENAI_API_KEY",
        detail=str(error.get("message") or ""),
        provider_code=code,
        content_policy=code in _POLICY_CODES,
    )
    if failure is not None:
        raise failure
