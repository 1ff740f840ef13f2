"""`sdwebui`: a Stable Diffusion server speaking the AUTOMATIC1111 / SD WebUI Forge API.

    POST {IMAGEGEN_SDWEBUI_URL}/sdapi/v1/txt2img   {prompt, negative_prompt, seed, width,
                                                    height, steps, force_task_id, ...}
    POST {IMAGEGEN_SDWEBUI_URL}/sdapi/v1/img2img   {init_images: [b64], mask?, ...}
      -> {"images": ["<b64 png>"], "parameters": {...}, "info": "..."}
    POST /internal/progress {id_task, live_preview: true}
      -> {active, queued, completed, progress (0-1), live_preview ("data:image/...")}
    POST /sdapi/v1/interrupt      (stops whatever job that server is running)
    POST /sdapi/v1/extra-single-image  {image: b64, resize_mode: 0, upscaling_resize,
                                        upscaler_1, ...} -> {image: "<b64 png>", html_info}
    GET  /sdapi/v1/sd-models      -> [{title, model_name, hash, filename, ...}]
    GET  /sdapi/v1/options        -> {sd_model_checkpoint: "<title>", ...}
    GET  /sdapi/v1/upscalers      -> [{name, model_name, model_path, model_url, scale}]

What goes out, field by field: `width`/`height` the asked size (for an edit without one,
the source's), `seed` the job's seed (the seed the server reports back is recorded),
`negative_prompt` natively, the style preset folded into `prompt` (the API's `styles`
are names saved on that one server, not presets; providers/prompting.py), the model as
below. An edit is img2img with every source in `init_images` and `resize_mode` 1
("Crop and resize": a source of another shape than `width`/`height` is scaled to cover
them and cropped around its centre, the pipeline's own fit rule, where A1111's default
0 would stretch it out of shape; the mask is resized the same way); a mask goes out as
A1111's inpainting mask (white = repaint, made from the contract's mask, whose
transparent pixels mark the area to change) with `inpainting_fill` 1 (start from the
original), `inpaint_full_res` false (the whole picture), `mask_blur` 4 and
`inpainting_mask_invert` 0. Replies are PNG; the pipeline converts and fits them.

An outpaint is an img2img inpaint of the padded canvas: `init_images` is the source on
its canvas with the new area pre-filled by stretching the source's edges
(providers/outpainting.py), `mask` is white over the new area and black over the
source, `width`/`height` are the canvas's, `inpainting_fill` 1 (start from that fill,
so sampling continues the source's colours), `denoising_strength` 0.9 (the new area
is invented, not retouched), `mask_blur` 4 (the seam blends over a few pixels of the
source's edge), `inpaint_full_res` false.

An upscale is `extra-single-image` with `resize_mode` 0, `upscaling_resize` the factor
and `upscaler_1` the upscaler (empty: the provider's default), nothing else (no face
restoration, no second upscaler). That endpoint takes no task id, so progress is only
its start and end and a cancel drops the call without the server-wide interrupt. The
image reports the upscaler as its model.

Each call carries our own task id, so progress is read for our job only. The interrupt
is global to the server: it is sent on cancel only while our task is the active one.

Models are the server's checkpoints by `model_name`, the loaded one first (the default:
an empty model sends no override, so the server keeps what it has loaded). They are
learned from the server when the service starts and again after a generation once the
list is older than `models_max_age` (or, when the server could not list them,
`models_retry` after that try), never at submit. A chosen model goes out as
`override_settings.sd_model_checkpoint` (restored afterwards by the server). Until the
list is learned the provider offers only `sdwebui`, its loaded checkpoint.

Upscalers are the server's `/sdapi/v1/upscalers` by name, learned at the same times.
"None" (no upscaling) is left out, and the plain resamples (Lanczos, Nearest) are put
last, so the default, the first, is one of the server's model upscalers when it has
any. Until the list is learned the provider offers Lanczos and Nearest, which every
A1111 server has.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pybase64
from PIL import Image

from imagegen.domain.enlarge import OutpaintGeometry
from imagegen.domain.errors import ImageTooLarge, ProviderFailed, ProviderNotConfigured
from imagegen.domain.models import STANDARD_SIZES, ImageFormat, UpscaleSpec
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
from imagegen.providers.http_failures import raise_for_status, transport_errors, transport_failure
from imagegen.providers.prompting import fold_prompt

log = logging.getLogger(__name__)


def _log_refresh_failure(task: asyncio.Task[tuple[str, ...]]) -> None:
    # refresh_models keeps the last lists on every failure it expects; anything else is
    # logged here rather than left to "Task exception was never retrieved".
    if not task.cancelled() and task.exception() is not None:
        log.error("refreshing the sdwebui server's lists failed", exc_info=task.exception())
MODEL = "sdwebui"
DEFAULT_STEPS = 20
#: Upscalers every A1111 server has: plain resamples, offered last.
RESAMPLERS = ("Lanczos", "Nearest")
#: A1111's name for "no upscaler"; never offered.
_NO_UPSCALER = "None"


class SDWebUIProvider:
    """An AUTOMATIC1111-compatible server behind the Provider protocol."""

    id = "sdwebui"
    display_name = "Stable Diffusion (SD WebUI)"
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
        outpaint=True,
        upscale=True,
    )

    def __init__(
        self,
        base_url: str | None,
        client: httpx.AsyncClient,
        *,
        steps: int = DEFAULT_STEPS,
        poll_interval: float = 0.5,
        models_timeout: float = 5.0,
        models_max_age: float = 300.0,
        models_retry: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = (base_url or "").rstrip("/")
        self._client = client
        self._steps = steps
        self._poll_interval = poll_interval
        self._models_timeout = models_timeout
        self._models_max_age = models_max_age
        self._models_retry = models_retry
        self._clock = clock
        self._models: tuple[str, ...] = (MODEL,)
        self._upscalers: tuple[str, ...] = RESAMPLERS
        #: when the list should be asked for again (None: never asked)
        self._models_due_at: float | None = None
        #: the refresh a finished call started in the background, while it runs
        self._refreshing: asyncio.Task[tuple[str, ...]] | None = None

    @property
    def configured(self) -> bool:
        return bool(self._base_url)

    @property
    def upscalers(self) -> tuple[str, ...]:
        """The server's upscalers (model upscalers first) as last learned; Lanczos and
        Nearest before that."""
        return self._upscalers

    @property
    def models(self) -> tuple[str, ...]:
        """The server's checkpoints (loaded first) as last learned; `sdwebui` before that."""
        return self._models

    def check(self, request: ProviderRequest) -> None:
        """Everything the contract allows maps onto txt2img, img2img or the extras
        endpoint; a model must be one of the server's checkpoints and an upscaler one of
        its upscalers (IMG_003 naming them)."""
        check_model(self.id, self.models, request.model)
        check_enlargement(self.id, self.capabilities, self.upscalers, request)

    async def refresh_models(self) -> tuple[str, ...]:
        """Learn the server's checkpoints and upscalers; keeps the last lists when the
        server cannot say (never raises). Each bounded by `models_timeout`. Returns the
        models."""
        if not self.configured:
            return self._models
        # Side by side, so an unreachable server delays the start by one timeout, not two.
        async with asyncio.TaskGroup() as group:
            models = group.create_task(self._learn_models())
            upscalers = group.create_task(self._learn_upscalers())
        learned = models.result() and upscalers.result()
        self._models_due_at = self._clock() + (
            self._models_max_age if learned else self._models_retry
        )
        return self._models

    def _refresh_soon(self) -> None:
        """Refresh the lists in the background when they are stale: the call that noticed
        does not wait for the server's listing, and calls ending together ask once."""
        if not self._models_stale():
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        self._refreshing = asyncio.create_task(
            self.refresh_models(), name="imagegen-sdwebui-refresh"
        )
        self._refreshing.add_done_callback(_log_refresh_failure)

    async def wait_refreshed(self) -> tuple[str, ...]:
        """The models once a background refresh in flight (if any) has ended."""
        if self._refreshing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._refreshing)
        return self._models

    async def aclose(self) -> None:
        """Stop a background refresh in flight (before its HTTP client closes)."""
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _get_json(self, path: str) -> Any:
        with transport_errors(provider=self.id, timeout=self._models_timeout):
            async with asyncio.timeout(self._models_timeout):
                reply = await self._client.get(
                    f"{self._base_url}{path}", timeout=self._models_timeout
                )
        raise_for_status(reply, provider=self.id)
        return reply.json()

    async def _learn_upscalers(self) -> bool:
        """Whether the server listed at least one upscaler (then they replace the last)."""
        try:
            listed = await self._get_json("/sdapi/v1/upscalers")
        except (ProviderFailed, ValueError) as exc:
            log.warning("could not learn the sdwebui server's upscalers: %s", exc)
            return False
        names = [
            str(item["name"])
            for item in (listed if isinstance(listed, list) else ())
            if isinstance(item, dict) and item.get("name") and item["name"] != _NO_UPSCALER
        ]
        if not names:
            return False
        # Stable: the server's order, with the plain resamples moved behind its models.
        names.sort(key=lambda name: name in RESAMPLERS)
        self._upscalers = tuple(dict.fromkeys(names))
        return True

    async def _learn_models(self) -> bool:
        """Whether the server listed at least one checkpoint (then they replace the last)."""
        try:
            with transport_errors(provider=self.id, timeout=self._models_timeout):
                async with asyncio.timeout(self._models_timeout):
                    listed = await self._client.get(
                        f"{self._base_url}/sdapi/v1/sd-models", timeout=self._models_timeout
                    )
                    options = await self._client.get(
                        f"{self._base_url}/sdapi/v1/options", timeout=self._models_timeout
                    )
            raise_for_status(listed, provider=self.id)
            raise_for_status(options, provider=self.id)
            checkpoints = listed.json()
            loaded = options.json().get("sd_model_checkpoint", "")
        except (ProviderFailed, ValueError, AttributeError) as exc:
            log.warning("could not learn the sdwebui server's models: %s", exc)
            return False
        names: list[str] = []
        first = ""
        for checkpoint in checkpoints if isinstance(checkpoints, list) else ():
            if not isinstance(checkpoint, dict) or not checkpoint.get("model_name"):
                continue
            name = str(checkpoint["model_name"])
            names.append(name)
            if loaded and loaded in (checkpoint.get("title"), name, checkpoint.get("filename")):
                first = name
        if names:
            if first:
                names.remove(first)
                names.insert(0, first)
            self._models = tuple(dict.fromkeys(names))
        return bool(names)

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """txt2img, or img2img for edits and outpaints, with progress read from the
        server while it runs; an upscale through the extras endpoint."""
        if not self.configured:
            raise ProviderNotConfigured(
                "the sdwebui provider has no server: set IMAGEGEN_SDWEBUI_URL"
            )
        if request.upscale is not None:
            return await self._upscale(request, request.upscale, progress)
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
        if request.model and request.model != MODEL:
            body["override_settings"] = {"sd_model_checkpoint": request.model}
            body["override_settings_restore_afterwards"] = True
        path = "/sdapi/v1/txt2img"
        if request.outpaint is not None:
            path = "/sdapi/v1/img2img"
            source = first_source(request, "an outpaint")
            body.update(await asyncio.to_thread(_outpaint_fields, source, request.outpaint))
        elif request.sources:
            path = "/sdapi/v1/img2img"
            body["init_images"] = [pybase64.b64encode(s.data).decode() for s in request.sources]
            body["denoising_strength"] = 0.6
            body["resize_mode"] = 1
            if request.mask is not None:
                mask = await asyncio.to_thread(inpainting_mask, request.mask.data)
                body.update(
                    mask=pybase64.b64encode(mask).decode(),
                    mask_blur=4,
                    inpainting_fill=1,
                    inpaint_full_res=False,
                    inpainting_mask_invert=0,
                    denoising_strength=0.75,
                )
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
        info = _info(reply)
        await progress(90, "received", None)
        self._refresh_soon()
        return ProviderImage(
            data=image,
            mime_type="image/png",
            model=str(info.get("sd_model_name") or request.model or self.models[0]),
            seed=_int_or(info.get("seed"), request.seed),
        )

    async def _upscale(
        self, request: ProviderRequest, upscale: UpscaleSpec, progress: ProgressCallback
    ) -> ProviderImage:
        source = first_source(request, "an upscale")
        upscaler = upscale.upscaler or self.upscalers[0]
        body: dict[str, Any] = {
            "image": pybase64.b64encode(source.data).decode(),
            "resize_mode": 0,
            "upscaling_resize": upscale.factor,
            "upscaler_1": upscaler,
            "upscaler_2": _NO_UPSCALER,
            "extras_upscaler_2_visibility": 0,
            "gfpgan_visibility": 0,
            "codeformer_visibility": 0,
            "upscale_first": False,
            "show_extras_results": True,
        }
        await progress(0, "upscaling", None)
        try:
            async with asyncio.timeout(request.timeout):
                reply = await self._post("/sdapi/v1/extra-single-image", body, request.timeout)
        except TimeoutError as exc:
            raise transport_failure(exc, provider=self.id, timeout=request.timeout) from exc
        image = _b64_image(reply.get("image"))
        await progress(90, "received", None)
        self._refresh_soon()
        return ProviderImage(data=image, mime_type="image/png", model=upscaler)

    def _models_stale(self) -> bool:
        return self._models_due_at is None or self._clock() >= self._models_due_at

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
    return _b64_image(images[0])


def _b64_image(value: object) -> bytes:
    """An image of a reply: base64, possibly as a data: URL."""
    if not isinstance(value, str) or not value:
        raise ProviderUnavailable("the sdwebui server answered without an image")
    try:
        return pybase64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderUnavailable("the sdwebui server sent an image that is not base64") from exc


def _outpaint_fields(source: SourceImage, geometry: OutpaintGeometry) -> dict[str, Any]:
    """The img2img fields of an outpaint (see the module docstring). Runs in a worker
    thread."""
    image = outpainting.decode_source(source.data, geometry)
    canvas = outpainting.filled(image, geometry)
    mask = outpainting.repaint_mask(geometry)
    return {
        "init_images": [pybase64.b64encode(outpainting.png(canvas)).decode()],
        "mask": pybase64.b64encode(outpainting.png(mask)).decode(),
        "width": geometry.canvas.width,
        "height": geometry.canvas.height,
        "resize_mode": 0,
        "mask_blur": 4,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "inpainting_mask_invert": 0,
        "denoising_strength": 0.9,
    }


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


def _info(reply: dict[str, Any]) -> dict[str, Any]:
    """The generation's `info` (a JSON string in A1111's reply), or {}."""
    try:
        info = json.loads(str(reply.get("info") or "{}"))
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _int_or(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def inpainting_mask(data: bytes) -> bytes:
    """A1111's inpainting mask (white repaints, black keeps) from the contract's mask
    (transparent pixels mark the area to change), as a greyscale PNG of the same size.
    A mask with no transparency changes nothing. Runs in a worker thread."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        has_alpha = "A" in opened.getbands() or "transparency" in opened.info
        alpha = (
            opened.convert("RGBA").getchannel("A")
            if has_alpha
            else Image.new("L", opened.size, 255)
        )
    repaint = alpha.point(lambda value: 255 if value < 128 else 0)
    out = io.BytesIO()
    repaint.save(out, format="PNG")
    return out.getvalue()
