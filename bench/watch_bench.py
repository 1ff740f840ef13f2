"""Benchmark: idle watch streams of one user against another user's GetGeneration.

A served process (embedded PostgreSQL with pg_stat_statements, local blob store). User
"watcher" has one job whose provider call never returns (a Forge-wire fake that holds
the request), so its watch streams stay open and quiet. Every client runs in its own
process:

1. Baseline: GetGeneration of user "reader"'s finished job, C concurrent calls for T
   seconds: req/s, p50, p99.
2. K client processes open S WatchGeneration streams in total (default 2,000) on the
   watcher's job, over channels of 100 streams each; each process reports once every
   stream has its QUEUED and STARTED events.
3. A quiet window with the streams open: the served process's CPU and the statements
   the database ran (both should be about 0).
4. GetGeneration again, as in 1, with the streams open.

Prints both runs, the p99 ratio (issue 9 item 8's figure: below 2), and the served
process's resident memory with the streams open. Asserts nothing.

    .venv/bin/python bench/watch_bench.py [--streams 2000] [--clients 4]
        [--concurrency 8] [--seconds 10] [--server-src PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from aiohttp import web
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from imagegen.identity import mint_token

sys.path.insert(0, str(Path(__file__).parent))
from generate_bench import Statements, cpu_seconds, start_postgres_with_statements

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
E = generation_pb2
STREAMS_PER_CHANNEL = 100
#: Streams a client opens before it waits for them to start.
OPEN_BATCH = 50


def channel(address: str) -> grpc.aio.Channel:
    # Its own connection (a local subchannel pool), as separate clients would have.
    return grpc.aio.insecure_channel(
        address,
        options=(("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)),
    )


# --- client processes -------------------------------------------------------------------


async def client_watch(address: str, token: str, name: str, count: int) -> None:
    """Open `count` watch streams, OPEN_BATCH at a time (each batch once the previous one
    has its STARTED events), say "ready" with the number of reopened streams, hold them
    until stdin closes. A burst of hundreds of stream opens makes grpc cancel some of
    them (a bare grpc.aio server does it too); a stream cancelled before its STARTED
    event is opened again and counted."""
    metadata = (("authorization", f"Bearer {token}"),)
    channels = [channel(address) for _ in range((count + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)]
    stubs = [generation_pb2_grpc.ImageGenerationServiceStub(c) for c in channels]
    started = 0
    reopened = 0
    progress = asyncio.Event()

    async def hold(stub: generation_pb2_grpc.ImageGenerationServiceStub) -> None:
        nonlocal started, reopened
        while True:
            call = stub.WatchGeneration(E.WatchGenerationRequest(name=name), metadata=metadata)
            got_started = False
            try:
                async for response in call:
                    if response.event.type == E.GENERATION_EVENT_TYPE_STARTED:
                        got_started = True
                        started += 1
                        progress.set()
            except grpc.aio.AioRpcError as err:
                if got_started or err.code() != grpc.StatusCode.CANCELLED:
                    print(f"a watch stream failed: {err.code()} {err.details()}", file=sys.stderr, flush=True)
                    raise
                reopened += 1
                continue
            print("a watch stream ended while its job was held", file=sys.stderr, flush=True)
            return

    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(hold(stubs[index // STREAMS_PER_CHANNEL])))
        if (index + 1) % OPEN_BATCH == 0 or index + 1 == count:
            while started < index + 1:
                progress.clear()
                await progress.wait()
    print(f"ready {reopened}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()


async def client_get(address: str, token: str, name: str, concurrency: int, seconds: float) -> None:
    """GetGeneration in a loop from `concurrency` tasks for `seconds`; prints JSON."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with channel(address) as ch:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(ch)
        request = E.GetGenerationRequest(name=name)
        for _ in range(50):  # warm-up
            await stub.GetGeneration(request, metadata=metadata, timeout=30)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                await stub.GetGeneration(request, metadata=metadata, timeout=30)
                latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    print(json.dumps({"calls": len(ordered), "rate": len(ordered) / wall, "p50": pct(0.5), "p99": pct(0.99)}))


# --- the conductor ----------------------------------------------------------------------


async def hold_forever(_request: web.Request) -> web.Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_get(address: str, token: str, name: str, concurrency: int, seconds: float) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client-get", address, token, name, str(concurrency), str(seconds),
        stdout=subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4, help="processes holding the streams")
    parser.add_argument("--concurrency", type=int, default=8, help="GetGeneration callers")
    parser.add_argument("--seconds", type=float, default=10.0, help="per GetGeneration run")
    parser.add_argument("--quiet-window", type=float, default=5.0)
    parser.add_argument("--server-src", default="", help="run the server from this src/ tree")
    parser.add_argument("--client-watch", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--client-get", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_watch:
        address, token, name, count = args.client_watch
        await client_watch(address, token, name, int(count))
        return
    if args.client_get:
        address, token, name, concurrency, seconds = args.client_get
        await client_get(address, token, name, int(concurrency), float(seconds))
        return

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="imagegen-watch-bench-"))
    tmp.chmod(0o755)
    app = web.Application()
    app.router.add_post("/images.v1.ImageService/GenerateImage", hold_forever)
    forge = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await forge.setup()
    site = web.TCPSite(forge, "127.0.0.1", 0)
    await site.start()
    forge_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    embedded, admin, _postmaster = await start_postgres_with_statements(tmp / "pg")
    await admin.execute('CREATE DATABASE "bench_watch"')
    dsn = embedded.dsn.replace("/postgres?", "/bench_watch?")
    plans = tmp / "plans.json"
    plans.write_text(json.dumps({"plans": {"free": {"monthly_credits": 1_000_000}}}))
    ready = tmp / "ready"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGEN_", "OTEL_"))},
        "IMAGEGEN_DATA_DIR": str(tmp / "served"),
        "IMAGEGEN_GRPC_PORT": "0",
        "IMAGEGEN_HTTP_PORT": "0",
        "IMAGEGEN_READY_FILE": str(ready),
        "IMAGEGEN_JWT_KEY": JWT_KEY,
        "IMAGEGEN_LOG_LEVEL": "WARNING",
        "IMAGEGEN_PLANS_FILE": str(plans),
        "IMAGEGEN_LOCAL_STEP_DELAY": "0",
        "IMAGEGEN_PROVIDER_TIMEOUT": "3600",
        "IMAGEGEN_LEASE": "600",
        "DATABASE_URL": dsn,
        "BUILT_IN_FORGE_API_URL": forge_url,
        "BUILT_IN_FORGE_API_KEY": "k",
    }
    if args.server_src:
        env["PYTHONPATH"] = str(Path(args.server_src).resolve())
    (tmp / "served").mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "served.log", "wb"),
    )
    while not ready.exists() or not ready.read_text().strip():
        if server.poll() is not None:
            raise SystemExit((tmp / "served.log").read_text())
        await asyncio.sleep(0.05)
    address = dict(p.split("=", 1) for p in ready.read_text().split()[2:])["grpc"]
    watcher = mint_token(JWT_KEY, user_id="watcher")
    reader = mint_token(JWT_KEY, user_id="reader")

    async with channel(address) as ch:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(ch)
        size = common_pb2.ImageSize(width=256, height=256)
        reader_md = (("authorization", f"Bearer {reader}"),)
        submitted = await stub.SubmitGeneration(
            E.SubmitGenerationRequest(spec=common_pb2.GenerationSpec(prompt="read me", provider="local", size=size)),
            metadata=reader_md,
        )
        reader_job = submitted.generation.name
        async for _ in stub.WatchGeneration(E.WatchGenerationRequest(name=reader_job), metadata=reader_md, timeout=60):
            pass
        held = await stub.SubmitGeneration(
            E.SubmitGenerationRequest(spec=common_pb2.GenerationSpec(prompt="held", provider="forge", size=size)),
            metadata=(("authorization", f"Bearer {watcher}"),),
        )

    baseline = await run_get(address, reader, reader_job, args.concurrency, args.seconds)
    rss_before = rss_mb(server.pid)

    per_client = [args.streams // args.clients + (i < args.streams % args.clients) for i in range(args.clients)]
    holders = []
    opened = time.perf_counter()
    for count in per_client:
        holders.append(
            await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--client-watch", address, watcher, held.generation.name, str(count),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
        )
    reopened = 0
    for holder in holders:
        assert holder.stdout is not None
        line = (await holder.stdout.readline()).decode().split()
        if not line or line[0] != "ready":
            raise SystemExit(f"a stream holder failed: {line!r}")
        reopened += int(line[1])
    open_s = time.perf_counter() - opened

    statements = Statements(admin, "bench_watch")
    await statements.reset()
    cpu_before = cpu_seconds(server.pid)
    await asyncio.sleep(args.quiet_window)
    quiet_cpu_ms = (cpu_seconds(server.pid) - cpu_before) * 1000
    quiet_statements = await statements.count()
    rss_streams = rss_mb(server.pid)

    loaded = await run_get(address, reader, reader_job, args.concurrency, args.seconds)

    for holder in holders:
        assert holder.stdin is not None
        holder.stdin.close()
        await holder.wait()
    server.terminate()
    server.wait(timeout=60)
    await admin.close()
    await embedded.stop()
    await forge.cleanup()
    shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    print(
        f"imagegen watch benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
        f"{os.cpu_count()} cores  python {platform.python_version()}"
        + (f"  server src={args.server_src}" if args.server_src else "")
    )
    print(
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
        f"  after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    print(
        f"{args.streams} idle WatchGeneration streams of one user from {args.clients} processes "
        f"(opened in {open_s:.1f} s, {reopened} reopened after grpc cancelled them at open); GetGeneration of another user, C={args.concurrency}, "
        f"{args.seconds:.0f} s per run, from its own process"
    )
    print(f"{'':<22} {'calls':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, run in (("without the streams", baseline), ("with the streams", loaded)):
        print(f"{label:<22} {run['calls']:7.0f} {run['rate']:8.1f} {run['p50']:8.2f} {run['p99']:8.2f}")
    print(
        f"ratio with/without: p50 {loaded['p50'] / baseline['p50']:.2f}  "
        f"p99 {loaded['p99'] / baseline['p99']:.2f}  req/s {loaded['rate'] / baseline['rate']:.2f}"
    )
    print(
        f"quiet {args.quiet_window:.0f} s with the streams open: served CPU {quiet_cpu_ms:.0f} ms, "
        f"{quiet_statements} statements in its database"
    )
    print(f"served RSS: {rss_before:.0f} MiB before the streams, {rss_streams:.0f} MiB with them")


if __name__ == "__main__":
    asyncio.run(main())
