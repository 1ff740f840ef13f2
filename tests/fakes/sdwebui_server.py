"""A local HTTP server speaking the AUTOMATIC1111 / SD WebUI API: txt2img, img2img,
per-task progress with live previews, the global interrupt, the checkpoint list
(sd-models, options), the upscaler list and the extras endpoint that upscales
(extra-single-image). It runs one job at a time, like the real server, and can hold a
foreign client's job first.

async with SDFake.start() as fake:
    fake.url      # for IMAGEGEN_SDWEBUI_URL
    fake.calls    # every txt2img/img2img/extra-single-image received: (path, JSON
                  # body); `wait_for(n)`
    fake.script(SDReply(...))   # else: an image at the asked width x height (extras:
                                # the received image's size times upscaling_resize)
    fake.checkpoints, fake.loaded   # what sd-models and options report
    fake.upscalers                  # what /sdapi/v1/upscalers reports, by name
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pybase64
from aiohttp import web
from PIL import Image

from tests.fakes import Pauses, Seen, drop_connection, png_bytes, serve_on_loopback

CHECKPOINTS = ("sd_xl_base_1.0", "v1-5-pruned-emaonly", "dreamshaper_8")
#: As A1111 lists them: "None" and its built-in resamples first, then model upscalers.
UPSCALERS = ("None", "Lanczos", "Nearest", "ESRGAN_4x", "LDSR", "R-ESRGAN 4x+", "SwinIR_4x")


@dataclass
class Task:
    id: str
    steps: int
    step: int = 0
    state: str = "queued"  # queued | active | completed
    interrupted: bool = False


@dataclass
class SDReply:
    """One scripted answer to txt2img/img2img."""

    status: int = 200
    #: width, height of the image answered (default: the asked width x height)
    size: tuple[int, int] | None = None
    #: FastAPI's error body: {"detail": ...} (A1111 answers {"error", "detail", "errors"})
    detail: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass
class SDFake:
    step_delay: float = 0.1
    calls: Seen[tuple[str, dict[str, Any]]] = field(default_factory=Seen)
    interrupts: int = 0
    url: str = ""
    tasks: dict[str, Task] = field(default_factory=dict)
    checkpoints: tuple[str, ...] = CHECKPOINTS
    loaded: str = CHECKPOINTS[1]
    model_requests: int = 0
    upscalers: tuple[str, ...] = UPSCALERS
    upscaler_requests: int = 0
    #: answer /sdapi/v1/upscalers with this HTTP status instead of the list
    upscalers_status: int = 200
    #: seconds the checkpoint list takes to answer (a slow or stuck server)
    models_delay: float = 0.0
    pauses: Pauses = field(default_factory=Pauses)
    _script: list[SDReply] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _current: Task | None = None

    def script(self, *replies: SDReply) -> None:
        self._script.extend(replies)

    def body(self, index: int = 0) -> dict[str, Any]:
        """The JSON body of the index-th txt2img/img2img call."""
        return self.calls[index][1]

    async def run_job(self, task: Task) -> None:
        async with self._lock:
            self._current = task
            task.state = "active"
            while task.step < task.steps and not task.interrupted:
                await self.pauses.sleep(self.step_delay)
                task.step += 1
            task.state = "completed"
            self._current = None

    def _title(self, name: str) -> str:
        return f"{name}.safetensors [{hashlib.sha256(name.encode()).hexdigest()[:10]}]"

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self.calls.record((request.path, body))
        reply = self._script.pop(0) if self._script else SDReply()
        if reply.delay:
            await self.pauses.sleep(reply.delay)
        if reply.drop:
            return await drop_connection(request)
        if reply.status != 200:
            return web.json_response(
                {"error": "HTTPException", "detail": reply.detail, "body": "", "errors": ""},
                status=reply.status,
                headers=reply.headers,
            )
        task = Task(body.get("force_task_id") or "anonymous", int(body.get("steps", 10)))
        self.tasks[task.id] = task
        await self.run_job(task)
        checkpoint = (body.get("override_settings") or {}).get("sd_model_checkpoint")
        if checkpoint is not None and checkpoint not in self.checkpoints:
            # A1111 does not refuse an unknown checkpoint; it keeps the loaded one.
            checkpoint = None
        model = checkpoint or self.loaded
        color = (200, 40, 40) if request.path.endswith("txt2img") else (40, 200, 40)
        width, height = reply.size or (int(body["width"]), int(body["height"]))
        image = pybase64.b64encode(png_bytes(width, height, color)).decode()
        info = {
            "prompt": body.get("prompt", ""),
            "negative_prompt": body.get("negative_prompt", ""),
            "seed": body.get("seed", -1),
            "width": width,
            "height": height,
            "sd_model_name": model,
            "sd_model_hash": self._title(model)[-11:-1],
        }
        return web.json_response({"images": [image], "parameters": body, "info": json.dumps(info)})

    async def _extras(self, request: web.Request) -> web.Response:
        """extra-single-image: upscale `image` by `upscaling_resize` with `upscaler_1`."""
        body = await request.json()
        await self.calls.record((request.path, body))
        reply = self._script.pop(0) if self._script else SDReply()
        if reply.delay:
            await self.pauses.sleep(reply.delay)
        if reply.drop:
            return await drop_connection(request)
        if reply.status != 200:
            return web.json_response(
                {"error": "HTTPException", "detail": reply.detail, "body": "", "errors": ""},
                status=reply.status,
                headers=reply.headers,
            )
        name = body.get("upscaler_1", "None")
        if name not in self.upscalers:
            # What A1111's postprocessing assertion turns into through its API.
            return web.json_response(
                {
                    "error": "AssertionError",
                    "detail": "",
                    "body": "",
                    "errors": f"could not find upscaler named {name}",
                },
                status=500,
            )
        with Image.open(io.BytesIO(pybase64.b64decode(body["image"]))) as received:
            width, height = received.size
        factor = float(body.get("upscaling_resize", 2))
        size = reply.size or (round(width * factor), round(height * factor))
        image = pybase64.b64encode(png_bytes(size[0], size[1], (40, 40, 200))).decode()
        info = f"<p>Postprocess upscale by: {factor:g}, Postprocess upscaler: {name}</p>"
        return web.json_response({"html_info": info, "image": image})

    async def _upscalers(self, _request: web.Request) -> web.Response:
        self.upscaler_requests += 1
        if self.upscalers_status != 200:
            return web.json_response({"detail": "scripted failure"}, status=self.upscalers_status)
        resamplers = ("None", "Lanczos", "Nearest")
        return web.json_response(
            [
                {
                    "name": name,
                    "model_name": None if name in resamplers else name.lower(),
                    "model_path": None if name in resamplers else f"/models/{name}.pth",
                    "model_url": None,
                    "scale": 4,
                }
                for name in self.upscalers
            ]
        )

    async def _progress(self, request: web.Request) -> web.Response:
        body = await request.json()
        task = self.tasks.get(body.get("id_task", ""))
        if task is None:
            return web.json_response({"active": False, "queued": False, "completed": False})
        preview = None
        if task.state == "active":
            shade = 20 + 200 * task.step // max(task.steps, 1)
            preview = (
                "data:image/png;base64,"
                + pybase64.b64encode(png_bytes(32, 32, (shade, shade, 255 - shade))).decode()
            )
        return web.json_response(
            {
                "active": task.state == "active",
                "queued": task.state == "queued",
                "completed": task.state == "completed",
                "progress": task.step / max(task.steps, 1),
                "eta": 1.0,
                "live_preview": preview,
                "id_live_preview": task.step,
                "textinfo": None,
            }
        )

    async def _interrupt(self, _request: web.Request) -> web.Response:
        self.interrupts += 1
        if self._current is not None:
            self._current.interrupted = True
        return web.json_response({})

    async def _sd_models(self, _request: web.Request) -> web.Response:
        self.model_requests += 1
        if self.models_delay:
            await asyncio.sleep(self.models_delay)
        return web.json_response(
            [
                {
                    "title": self._title(name),
                    "model_name": name,
                    "hash": self._title(name)[-11:-1],
                    "sha256": None,
                    "filename": f"/models/Stable-diffusion/{name}.safetensors",
                    "config": None,
                }
                for name in self.checkpoints
            ]
        )

    async def _options(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"sd_model_checkpoint": self._title(self.loaded), "samples_format": "png"}
        )

    def start_foreign_job(self, steps: int) -> asyncio.Task[None]:
        """Occupy the server with another client's job."""
        task = Task("task(someone-else)", steps)
        self.tasks[task.id] = task
        return asyncio.create_task(self.run_job(task))

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, step_delay: float = 0.1) -> AsyncIterator[SDFake]:
        fake = cls(step_delay=step_delay)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/sdapi/v1/txt2img", fake._generate)
        app.router.add_post("/sdapi/v1/img2img", fake._generate)
        app.router.add_post("/internal/progress", fake._progress)
        app.router.add_post("/sdapi/v1/interrupt", fake._interrupt)
        app.router.add_get("/sdapi/v1/sd-models", fake._sd_models)
        app.router.add_get("/sdapi/v1/options", fake._options)
        app.router.add_get("/sdapi/v1/upscalers", fake._upscalers)
        app.router.add_post("/sdapi/v1/extra-single-image", fake._extras)
        async with serve_on_loopback(app) as url:
            fake.url = url
            try:
                yield fake
            finally:
                fake.pauses.stop()
