"""A local HTTP server speaking the AUTOMATIC1111 / SD WebUI API: txt2img, img2img,
per-task progress with live previews, and the global interrupt. It runs one job at a
time, like the real server, and can hold a foreign client's job first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pybase64
from aiohttp import web

from tests.fakes import serve_on_loopback
from tests.fakes.forge_server import png_bytes


@dataclass
class Task:
    id: str
    steps: int
    step: int = 0
    state: str = "queued"  # queued | active | completed
    interrupted: bool = False


@dataclass
class SDFake:
    step_delay: float = 0.1
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    interrupts: int = 0
    url: str = ""
    tasks: dict[str, Task] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _current: Task | None = None

    async def run_job(self, task: Task) -> None:
        async with self._lock:
            self._current = task
            task.state = "active"
            while task.step < task.steps and not task.interrupted:
                await asyncio.sleep(self.step_delay)
                task.step += 1
            task.state = "completed"
            self._current = None

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.path, body))
        task = Task(body.get("force_task_id") or "anonymous", int(body.get("steps", 10)))
        self.tasks[task.id] = task
        await self.run_job(task)
        color = (200, 40, 40) if request.path.endswith("txt2img") else (40, 200, 40)
        image = pybase64.b64encode(png_bytes(body["width"], body["height"], color)).decode()
        return web.json_response({"images": [image], "parameters": {}, "info": "{}"})

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
        async with serve_on_loopback(app) as url:
            fake.url = url + ""
            yield fake
