"""`sdwebui`: a Stable Diffusion server speaking the AUTOMATIC1111 / SD WebUI Forge API.

    POST {IMAGEGEN_SDWEBUI_URL}/sdapi/v1/txt2img   {prompt, negative_prompt, seed, width,
                                                    height, steps, force_task_id, ...}
    POST {IMAGEGEN_SDWEBUI_URL}/sdapi/v1/img2img   {init_images: [b64], mask?, ...}
      -> {"images": ["<b64 png>"], "parameters": {...}, "info": "..."}
    POST /internal/progress {id_task, live_preview: true}
      -> {active, queued, completed, progress (0-1), live_preview ("data:image/...")}
    POST /sdapi/v1/interrupt      (stops whatever job that server is running)

Each call carries our own task id, so progress is read for our job only. The interrupt
is global to the server: it is sent on cancel only while our task is the active one.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import uuid
from typing import Any

import httpx
import pybase64

from imagegen.domain.errors import ImageTooLarge, ProviderNotConfigured
from imagegen.domain.models import STANDARD_SIZES, ImageFormat
from imagegen.imaging import ImageDecodeError, make_preview_from_bytes
from imagegen.providers.base import (
    ProgressCallback,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
    ProviderUnavailable,
)
from imagegen.providers.http_failures import raise_for_status, transport_errors, transport_failure
from imagegen.providers.prompting import fold_prompt

log = logging.getLogger(__name__)
MODEL = "sdwebui"
DEFAULT_STEPS = 20


class SDWebUIProvider:
    """An AUTOMATIC1111-compatible server behind the Provider protocol."""

    id = "sdwebui"
    display_name = "Stable Diffusion (SD WebUI)"
    models = (MODEL,)
    capabilities = ProviderCapabilities(
        edit=True,
        mask=True,
        negative_prompt=True,
        seed=True,
        style=False,
        previews=True,
        sizes=STANDARD_SIZES,
        formats=tuple(ImageFormat),
        max_count=4,
    )

    def __init__(
        self,
        base_url: str | None,
        client: httpx.AsyncClient,
        *,
        steps: int = DEFAULT_STEPS,
        poll_interval: float = 0.5,
    ) -> None:
        self._base_url = (base_url or "").rstrip("/")
        self._client = client
        self._steps = steps
        self._poll_interval = poll_interval

    @property
    def configured(self) -> bool:
        return bool(self._base_url)

    def check(self, request: ProviderRequest) -> None:
        """Everything the contract allows maps onto txt2img or img2img."""

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """txt2img, or img2img for edits, with progress read from the server while it runs."""
        if not self.configured:
            raise ProviderNotConfigured(
                "the sdwebui provider has no server: set IMAGEGEN_SDWEBUI_URL"
            )
        task_id = f"task(imagegen-{uuid.uuid4().hex})"
        size = request.resize_to or request.size
        body: dict[str, Any] = {
            "prompt": fold_prompt(request.prompt, "", request.style),
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "width": size.width,
            "height": size.height,
            "steps": self._steps,
            "batch_size": 1,
            "n_iter": 1,
            "force_task_id": task_id,
        }
        path = "/sdapi/v1/txt2img"
        if request.sources:
            path = "/sdapi/v1/img2img"
            body["init_images"] = [pybase64.b64encode(s.data).decode() for s in request.sources]
            body["denoising_strength"] = 0.6
            if request.mask is not None:
                body["mask"] = pybase64.b64encode(request.mask.data).decode()
        await progress(0, "queued", None)
        call = asyncio.create_task(self._post(path, body, request.timeout))
        try:
            async with asyncio.timeout(request.timeout):
                while not call.done():
                    done, _ = await asyncio.wait({call}, timeout=self._poll_interval)
                    if not done:
                        await self._report(task_id, progress)
                reply = call.result()
        except TimeoutError as exc:
            await self._interrupt_if_ours(task_id)
            raise transport_failure(exc, provider=self.id, timeout=request.timeout) from exc
        except asyncio.CancelledError:
            # Cancelled by the job's owner (or shutdown): stop the server's work only if
            # it is ours; another client's job must not be interrupted.
            await asyncio.shield(self._interrupt_if_ours(task_id))
            raise
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call
        image = _first_image(reply)
        await progress(90, "received", None)
        return ProviderImage(data=image, mime_type="image/png", model=MODEL, seed=request.seed)

    async def _post(self, path: str, body: dict[str, Any], budget: float) -> dict[str, Any]:
        with transport_errors(provider=self.id, timeout=budget):
            reply = await self._client.post(self._base_url + path, json=body, timeout=budget)
        raise_for_status(reply, provider=self.id, detail=_error_detail(reply))
        try:
            data = reply.json()
        except ValueError as exc:
            raise ProviderUnavailable(
                "the sdwebui server answered something that is not JSON"
            ) from exc
        if not isinstance(data, dict):
            raise ProviderUnavailable("the sdwebui server answered an unexpected shape")
        return data

    async def _task_state(self, task_id: str) -> dict[str, Any]:
        reply = await self._client.post(
            f"{self._base_url}/internal/progress",
            json={"id_task": task_id, "id_live_preview": -1, "live_preview": True},
            timeout=5,
        )
        reply.raise_for_status()
        state = reply.json()
        return state if isinstance(state, dict) else {}

    async def _report(self, task_id: str, progress: ProgressCallback) -> None:
        try:
            state = await self._task_state(task_id)
        except (httpx.HTTPError, ValueError):
            return  # progress is best effort; the result decides the outcome
        if not state.get("active"):
            return
        fraction = float(state.get("progress") or 0.0)
        preview: bytes | None = None
        live = str(state.get("live_preview") or "")
        if live.startswith("data:") and "," in live:
            try:
                raw = pybase64.b64decode(live.split(",", 1)[1], validate=True)
                preview = await asyncio.to_thread(make_preview_from_bytes, raw)
            except (binascii.Error, ValueError, ImageDecodeError, ImageTooLarge):
                preview = None
        await progress(5 + int(80 * min(max(fraction, 0.0), 1.0)), "sampling", preview)

    async def _interrupt_if_ours(self, task_id: str) -> None:
        try:
            state = await self._task_state(task_id)
            if state.get("active"):
                await self._client.post(f"{self._base_url}/sdapi/v1/interrupt", timeout=5)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("could not stop the sdwebui job: %s", exc)


def _first_image(reply: dict[str, Any]) -> bytes:
    images = reply.get("images")
    if not isinstance(images, list) or not images:
        raise ProviderUnavailable("the sdwebui server answered without an image")
    try:
        return pybase64.b64decode(str(images[0]).split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderUnavailable("the sdwebui server sent an image that is not base64") from exc


def _error_detail(reply: httpx.Response) -> str:
    """The server's own words for a failure (FastAPI's `detail`, or A1111's `error` and
    `errors`), when there are any."""
    if reply.status_code < 400:
        return ""
    try:
        body = reply.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    for key in ("detail", "errors", "error"):
        if body.get(key):
            return str(body[key])[:300]
    return ""
