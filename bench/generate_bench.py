"""Benchmark: N concurrent GenerateImage streams against a served process, compared
with the direct path measured in the same run.

The provider is a local HTTP server speaking the Forge ImageService wire format that
answers at once with a fixed 512x512 PNG, so the figures measure our overhead, not
rendering. The direct path does the same work without gRPC or a job: provider call,
base64 decode, image check, blob put, one row insert. Prints figures; asserts nothing.

    ./dev bench [--levels 1,8,64] [--per-level 64]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import httpx
import pybase64
from aiohttp import web
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from PIL import Image

from imagegen import imaging
from imagegen.embedded import start_embedded_postgres
from imagegen.identity import mint_token
from imagegen.repositories.migrator import apply_migrations
from imagegen.storage.local import LocalBlobStore

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
FORGE_KEY = "bench-forge-key"


def _png(size: int = 512) -> bytes:
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    assert pixels is not None
    for y in range(0, size, 8):
        for x in range(0, size, 8):
            pixels[x, y] = ((x * 7) % 256, (y * 3) % 256, (x + y) % 256)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def start_forge_fake(png: bytes) -> tuple[web.AppRunner, str]:
    body = json.dumps(
        {"image": {"b64Json": pybase64.b64encode(png).decode(), "mimeType": "image/png"}}
    )

    async def generate(_request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/images.v1.ImageService/GenerateImage", generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@dataclass
class Figures:
    label: str
    concurrency: int
    count: int
    wall_s: float
    latencies: list[float]
    first_event: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.wall_s

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run_levels(levels: list[int], per_level: int, work) -> list[Figures]:  # type: ignore[no-untyped-def]
    results = []
    for concurrency in levels:
        total = max(per_level, concurrency)
        latencies: list[float] = []
        firsts: list[float] = []
        queue = list(range(total))

        async def worker() -> None:
            while queue:
                queue.pop()
                began = time.perf_counter()
                first = await work()
                latencies.append(time.perf_counter() - began)
                firsts.append(first - began)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        results.append(
            Figures("", concurrency, total, time.perf_counter() - started, latencies, firsts)
        )
    return results


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--per-level", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="IMAGEGEN_WORKERS of the server")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    png = _png()
    forge_runner, forge_url = await start_forge_fake(png)
    tmp = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    embedded = await start_embedded_postgres(tmp / "pg")
    admin = await asyncpg.connect(embedded.dsn)
    for name in ("bench_direct", "bench_served"):
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    direct_dsn = embedded.dsn.replace("/postgres?", "/bench_direct?")
    served_dsn = embedded.dsn.replace("/postgres?", "/bench_served?")
    await apply_migrations(direct_dsn)

    # --- direct path -------------------------------------------------------------------
    pool = await asyncpg.create_pool(direct_dsn, min_size=2, max_size=20)
    store = LocalBlobStore(
        root=tmp / "direct-blobs", public_url="http://127.0.0.1:1", signing_key=b"k" * 32
    )
    http = httpx.AsyncClient(trust_env=False, timeout=30, limits=httpx.Limits(max_connections=100))

    async def direct_once() -> float:
        reply = await http.post(
            f"{forge_url}/images.v1.ImageService/GenerateImage",
            headers={"Authorization": f"Bearer {FORGE_KEY}"},
            json={"prompt": "bench"},
        )
        first = time.perf_counter()
        data = pybase64.b64decode(reply.json()["image"]["b64Json"], validate=True)
        info = await asyncio.to_thread(imaging.inspect_image, data, max_pixels=16_777_216)
        image_id = uuid.uuid4()
        key = f"direct/{image_id}.png"
        await store.put(key, data, info.mime_type)
        await pool.execute(
            "INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,"
            " provider, prompt) VALUES ($1, 'bench', $2, $3, $4, $5, $6, 'forge', 'bench')",
            image_id,
            key,
            info.mime_type,
            info.width,
            info.height,
            len(data),
        )
        return first

    direct = await run_levels(levels, args.per_level, direct_once)
    await pool.close()

    # --- served path -------------------------------------------------------------------
    ready = tmp / "ready"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGEN_", "OTEL_"))},
        "IMAGEGEN_DATA_DIR": str(tmp / "served"),
        "IMAGEGEN_GRPC_PORT": "0",
        "IMAGEGEN_HTTP_PORT": "0",
        "IMAGEGEN_READY_FILE": str(ready),
        "IMAGEGEN_JWT_KEY": JWT_KEY,
        "IMAGEGEN_WORKERS": str(args.workers),
        "IMAGEGEN_LOG_LEVEL": "WARNING",
        "DATABASE_URL": served_dsn,
        "BUILT_IN_FORGE_API_URL": forge_url,
        "BUILT_IN_FORGE_API_KEY": FORGE_KEY,
    }
    (tmp / "served").mkdir()
    # Plan limits and credits out of the way: the benchmark measures the pipeline.
    plans = tmp / "plans.json"
    plans.write_text(
        json.dumps(
            {
                "plans": {
                    "enterprise": {
                        "requests_per_hour": None,
                        "requests_per_day": None,
                        "concurrent": None,
                        "monthly_credits": 10_000_000,
                    }
                }
            }
        )
    )
    env["IMAGEGEN_PLANS_FILE"] = str(plans)
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "served.log", "wb"),
    )
    while not ready.exists() or not ready.read_text().strip():
        if process.poll() is not None:
            raise SystemExit((tmp / "served.log").read_text())
        await asyncio.sleep(0.05)
    address = dict(p.split("=", 1) for p in ready.read_text().split()[2:])["grpc"]
    metadata = (
        ("authorization", f"Bearer {mint_token(JWT_KEY, user_id='bench', plan='enterprise')}"),
    )
    channel = grpc.aio.insecure_channel(address, options=(("grpc.enable_http_proxy", 0),))
    stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
    spec = common_pb2.GenerationSpec(
        prompt="bench", size=common_pb2.ImageSize(width=512, height=512)
    )

    async def served_once() -> float:
        first = 0.0
        async for response in stub.GenerateImage(
            generation_pb2.GenerateImageRequest(spec=spec), metadata=metadata, timeout=120
        ):
            if not first:
                first = time.perf_counter()
            if response.event.type == generation_pb2.GENERATION_EVENT_TYPE_FAILED:
                raise SystemExit(f"generation failed: {response.event.error}")
        return first

    served = await run_levels(levels, args.per_level, served_once)
    rss = peak_rss_mb(process.pid)
    await channel.close()
    process.terminate()
    process.wait(timeout=60)
    await http.aclose()
    await forge_runner.cleanup()
    await embedded.stop()

    print(
        f"imagegen benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
        f"{os.cpu_count()} cores  python {platform.python_version()}  server workers={args.workers}"
    )
    print(
        f"{'N':>3} {'path':<7} {'gen/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'first ms':>9}   ratio (served/direct): gen/s  p50  p99"
    )
    for d, s in zip(direct, served, strict=True):
        for label, f in (("direct", d), ("served", s)):
            print(
                f"{f.concurrency:>3} {label:<7} {f.rate:8.1f} {f.pct(f.latencies, 0.5):8.1f} "
                f"{f.pct(f.latencies, 0.95):8.1f} {f.pct(f.latencies, 0.99):8.1f} "
                f"{statistics.median(f.first_event) * 1000:9.1f}",
                end="",
            )
            if label == "served":
                print(
                    f"   {s.rate / d.rate:5.2f}  {s.pct(s.latencies, 0.5) / d.pct(d.latencies, 0.5):5.2f}"
                    f"  {s.pct(s.latencies, 0.99) / d.pct(d.latencies, 0.99):5.2f}"
                )
            else:
                print()
    print(f"peak RSS of the served process: {rss:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
