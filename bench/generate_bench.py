"""Benchmark: N concurrent GenerateImage streams against a served process, compared
with the direct path measured in the same run.

Workloads (`--workload`):
- s3-1024 (default): the provider is a Forge-wire fake answering at once with a
  ~1.5 MiB 1024x1024 PNG of photographic-like content (bench/codec_bench.py's
  `photo_like`, so it compresses like a photograph, not flat colour); blobs go to
  moto's S3 server. The request asks for 1024x1024 PNG, so the served path stores the
  reply as it came.
- local-512: a fixed 512x512 PNG, blobs in the local store (the first version).

The direct path does the same work as a bare script, without gRPC or a job: provider
call, base64 decode, header check, blob put, one row insert.

The fakes (Forge and moto) run in their own process, so neither side's CPU figure
includes them. Printed per level: gen/s, p50/p95/p99 latency, time to the first event
(QUEUED for the served path, the provider's reply for the direct one), CPU ms per
generation of the served process (from /proc before and after) or of this process for
the direct path, PostgreSQL's CPU ms per generation (its processes, from /proc), and
statements per generation (pg_stat_statements, preloaded into the embedded server),
with the load average before and after. Prints figures; asserts nothing.

    ./dev bench [--workload s3-1024|local-512] [--levels 1,8,64] [--per-level 128]
                [--workers 16] [--server-src PATH]

`--server-src` runs the served process from another checkout's `src/` (the "before"
figures of bench/README.md come from the parent commit's tree this way).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import httpx
import psutil
import pybase64
from harness import start_forge_fake
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from PIL import Image

from imagegen import imaging
from imagegen.config import S3Settings
from imagegen.embedded import start_embedded_postgres
from imagegen.identity import mint_token
from imagegen.repositories.db import open_pool
from imagegen.repositories.migrator import apply_migrations
from imagegen.storage.local import LocalBlobStore
from imagegen.storage.s3 import open_s3_store

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
FORGE_KEY = "bench-forge-key"
BUCKET = "bench-images"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the fakes' process ---------------------------------------------------------------


def _flat_png(size: int = 512) -> bytes:
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    assert pixels is not None
    for y in range(0, size, 8):
        for x in range(0, size, 8):
            pixels[x, y] = ((x * 7) % 256, (y * 3) % 256, (x + y) % 256)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reply_png(workload: str) -> bytes:
    if workload == "local-512":
        return _flat_png()
    sys.path.insert(0, str(Path(__file__).parent))
    from codec_bench import photo_like, png_of

    return png_of(photo_like(1024, 1024))


async def serve_fakes(workload: str, out: Path) -> None:
    """Run the Forge fake (and moto's S3 server) until SIGTERM; write their URLs to `out`."""
    png = reply_png(workload)
    runner, forge_url = await start_forge_fake(png)
    urls: dict[str, object] = {"forge": forge_url, "png_bytes": len(png)}
    moto = None
    if workload == "s3-1024":
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, moto_port = moto.get_host_and_port()
        urls["s3"] = f"http://{host}:{moto_port}"
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    out.write_text(json.dumps(urls))
    await stop.wait()
    if moto is not None:
        moto.stop()
    await runner.cleanup()


# --- measuring ------------------------------------------------------------------------


@dataclass
class Figures:
    concurrency: int
    count: int
    wall_s: float
    latencies: list[float]
    first_event: list[float]
    cpu_s: float = 0.0
    pg_cpu_s: float = 0.0
    statements: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.count / self.wall_s

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def postgres_cpu(postmaster: int) -> float:
    """CPU of the PostgreSQL server: the postmaster and its live children."""
    total = 0.0
    try:
        main = psutil.Process(postmaster)
        for process in (main, *main.children()):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        pass
    return total


class Statements:
    """Statements run in one database, from pg_stat_statements (cluster-wide, reset per level)."""

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self._admin = admin
        self._database = database

    async def reset(self) -> None:
        await self._admin.execute("SELECT pg_stat_statements_reset()")

    async def count(self) -> int:
        value = await self._admin.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
            self._database,
        )
        return int(value)

    async def top(self, limit: int = 40) -> list[tuple[int, str]]:
        rows = await self._admin.fetch(
            "SELECT calls, query FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 "
            "ORDER BY calls DESC LIMIT $2",
            self._database,
            limit,
        )
        return [(int(r["calls"]), " ".join(r["query"].split())[:110]) for r in rows]


async def run_levels(
    levels: list[int],
    per_level: int,
    work: Callable[[], Awaitable[float]],
    *,
    cpu_of: Callable[[], float],
    pg_cpu: Callable[[], float],
    statements: Statements,
) -> list[Figures]:
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

        await statements.reset()
        cpu_before, pg_before = cpu_of(), pg_cpu()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        figures = Figures(concurrency, total, wall, latencies, firsts)
        figures.cpu_s = cpu_of() - cpu_before
        figures.pg_cpu_s = pg_cpu() - pg_before
        figures.statements = await statements.count()
        results.append(figures)
    return results


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def start_postgres_with_statements(root: Path):  # type: ignore[no-untyped-def]
    """The embedded server, restarted once with pg_stat_statements preloaded."""
    embedded = await start_embedded_postgres(root)
    admin = await asyncpg.connect(embedded.dsn)
    await admin.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    await admin.execute("ALTER SYSTEM SET pg_stat_statements.track_utility = on")
    await admin.close()
    await embedded.stop()
    embedded = await start_embedded_postgres(root)
    admin = await asyncpg.connect(embedded.dsn)
    await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    postmaster = int((root / "postgres" / "postmaster.pid").read_text().split()[0])
    return embedded, admin, postmaster


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate a child this run started, if it still runs."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=("s3-1024", "local-512"), default="s3-1024")
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--per-level", type=int, default=128)
    parser.add_argument("--workers", type=int, default=16, help="IMAGEGEN_WORKERS of the server")
    parser.add_argument("--server-src", default="", help="run the server from this src/ tree")
    parser.add_argument("--statements", action="store_true", help="print the top statements")
    parser.add_argument("--serve-fakes", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fakes:
        await serve_fakes(args.workload, Path(args.serve_fakes))
        return
    levels = [int(x) for x in args.levels.split(",")]
    load_before = os.getloadavg()
    size = 1024 if args.workload == "s3-1024" else 512

    tmp = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    tmp.chmod(0o755)
    fakes_file = tmp / "fakes.json"
    fakes = subprocess.Popen(
        [sys.executable, __file__, "--workload", args.workload, "--serve-fakes", str(fakes_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Also when the run ends early (a server that does not start): no fakes left behind.
    atexit.register(stop_process, fakes)
    while not fakes_file.exists() or not fakes_file.read_text():
        if fakes.poll() is not None:
            raise SystemExit("the fakes' process ended")
        await asyncio.sleep(0.05)
    urls = json.loads(fakes_file.read_text())
    forge_url = urls["forge"]

    embedded, admin, postmaster = await start_postgres_with_statements(tmp / "pg")
    for name in ("bench_direct", "bench_served"):
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    direct_dsn = embedded.dsn.replace("/postgres?", "/bench_direct?")
    served_dsn = embedded.dsn.replace("/postgres?", "/bench_served?")
    await apply_migrations(direct_dsn)

    s3_settings = None
    if "s3" in urls:
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        s3_settings = S3Settings(endpoint=urls["s3"], bucket=BUCKET, region="us-east-1", prefix="")
        async with open_s3_store(s3_settings) as store:
            await store._client.create_bucket(Bucket=BUCKET)

    # --- direct path -------------------------------------------------------------------
    # Our pool settings (no reset round trip on release), so the direct path is one
    # statement per generation.
    pool = await open_pool(direct_dsn, min_size=2, max_size=20)
    http = httpx.AsyncClient(trust_env=False, timeout=60, limits=httpx.Limits(max_connections=100))
    limits = imaging.ImageLimits(max_pixels=16_777_216)
    async with contextlib.AsyncExitStack() as stack:
        if s3_settings is not None:
            store = await stack.enter_async_context(open_s3_store(s3_settings))
        else:
            store = LocalBlobStore(  # type: ignore[assignment]
                root=tmp / "direct-blobs", public_url="http://127.0.0.1:1", signing_key=b"k" * 32
            )

        async def direct_once() -> float:
            reply = await http.post(
                f"{forge_url}/images.v1.ImageService/GenerateImage",
                headers={"Authorization": f"Bearer {FORGE_KEY}"},
                json={"prompt": "bench"},
            )
            first = time.perf_counter()
            data = pybase64.b64decode(reply.json()["image"]["b64Json"], validate=True)
            header = imaging.read_header(data, limits)
            image_id = uuid.uuid4()
            key = f"direct/{image_id}.png"
            await store.put(key, data, "image/png")
            await pool.execute(
                "INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,"
                " provider, prompt) VALUES ($1, 'bench', $2, 'image/png', $3, $4, $5, 'forge', 'bench')",
                image_id,
                key,
                header.width,
                header.height,
                len(data),
            )
            return first

        direct = await run_levels(
            levels,
            args.per_level,
            direct_once,
            cpu_of=lambda: cpu_seconds(os.getpid()),
            pg_cpu=lambda: postgres_cpu(postmaster),
            statements=Statements(admin, "bench_direct"),
        )
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
    if s3_settings is not None:
        env.update({"IMAGEGEN_S3_ENDPOINT": s3_settings.endpoint, "IMAGEGEN_S3_BUCKET": BUCKET})
    if args.server_src:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(args.server_src).resolve()), env.get("PYTHONPATH", "")) if p
        )
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
    process = subprocess.Popen(  # stopped at exit too, by the atexit hook below
        [sys.executable, "-m", "imagegen.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "served.log", "wb"),
    )
    atexit.register(stop_process, process)
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
        prompt="bench", provider="forge", size=common_pb2.ImageSize(width=size, height=size)
    )

    async def served_once() -> float:
        first = 0.0
        async for response in stub.GenerateImage(
            generation_pb2.GenerateImageRequest(spec=spec), metadata=metadata, timeout=300
        ):
            if not first:
                first = time.perf_counter()
            if response.event.type == generation_pb2.GENERATION_EVENT_TYPE_FAILED:
                raise SystemExit(f"generation failed: {response.event.error}")
        return first

    # One generation first: connections opened and statements prepared, as in service.
    await served_once()
    served_statements = Statements(admin, "bench_served")
    served = await run_levels(
        levels,
        args.per_level,
        served_once,
        cpu_of=lambda: cpu_seconds(process.pid),
        pg_cpu=lambda: postgres_cpu(postmaster),
        statements=served_statements,
    )
    top = await served_statements.top() if args.statements else []
    rss = peak_rss_mb(process.pid)
    await channel.close()
    process.terminate()
    process.wait(timeout=60)
    await http.aclose()
    await admin.close()
    await embedded.stop()
    fakes.terminate()
    fakes.wait(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    print(
        f"imagegen benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
        f"{os.cpu_count()} cores  python {platform.python_version()}  workload={args.workload} "
        f"(reply {urls['png_bytes'] / 1048576:.2f} MiB)  server workers={args.workers}"
        + (f"  server src={args.server_src}" if args.server_src else "")
    )
    print(
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
        f"  after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    print(
        f"{'N':>3} {'path':<7} {'gen/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'first ms':>9} {'cpu ms':>7} {'pg cpu':>7} {'stmts':>6}"
        "   served/direct: gen/s   p50   p99  cpu"
    )
    for d, s in zip(direct, served, strict=True):
        for label, f in (("direct", d), ("served", s)):
            print(
                f"{f.concurrency:>3} {label:<7} {f.rate:7.1f} {f.pct(f.latencies, 0.5):8.1f} "
                f"{f.pct(f.latencies, 0.95):8.1f} {f.pct(f.latencies, 0.99):8.1f} "
                f"{statistics.median(f.first_event) * 1000:9.1f} "
                f"{f.cpu_s * 1000 / f.count:7.1f} {f.pg_cpu_s * 1000 / f.count:7.1f} "
                f"{f.statements / f.count:6.1f}",
                end="",
            )
            if label == "served":
                print(
                    f"                 {s.rate / d.rate:5.2f} "
                    f"{s.pct(s.latencies, 0.5) / d.pct(d.latencies, 0.5):5.2f} "
                    f"{s.pct(s.latencies, 0.99) / d.pct(d.latencies, 0.99):5.2f} "
                    f"{(s.cpu_s / s.count) / (d.cpu_s / d.count):4.1f}"
                )
            else:
                print()
    print(
        "cpu ms: per generation, of the served process (served) or of this process (direct);"
        " pg cpu: PostgreSQL's; stmts: per generation, pg_stat_statements"
    )
    print(f"peak RSS of the served process: {rss:.0f} MiB")
    for calls, query in top:
        print(f"{calls:7d}  {query}")


if __name__ == "__main__":
    asyncio.run(main())
