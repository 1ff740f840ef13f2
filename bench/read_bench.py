"""Benchmark: the read path against gRPC's own pace, measured in one run.

GetImage, GetGeneration and ListImages (20 per page) at concurrency C = 1, 16 and 64
from separate client processes (each with its own grpc.aio channel) against a served
process (`imagegen serve` as a child: S3 is moto's server, PostgreSQL the embedded
one, a seeded library). In the same run and with the same client harness:

- the echo ceiling: a bare grpc.aio server (its own process) with one unary method
  that returns its request, called with the same metadata (the bearer token) and a
  request of GetImage's size: what gRPC in Python costs before any work;
- the bare SQL of each read: the repository's own statements through asyncpg from
  the client processes (the repository methods the service calls, rows mapped).

Clients send pre-serialized requests and do not parse replies (each reply is checked
once before the runs), so the client's cost is the same whatever it calls. Prints
req/s, p50/p99 per method and C, the ratio to the echo ceiling at the same C, and CPU
milliseconds per request of the server process and of PostgreSQL (all its processes).
Asserts nothing.

    ./dev bench reads [--levels 1,16,64] [--seconds 3] [--clients 2] [--profile DIR]

With --profile, py-spy (`pip install py-spy`) samples the served process during each
method's run at the highest C; the top functions are printed and the raw stacks kept.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import psutil
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
)

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
USER = "bench"
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
ECHO_METHOD = "/bench.Echo/Echo"
GET_IMAGE = "/imagegen.v1.ImageLibraryService/GetImage"
GET_GENERATION = "/imagegen.v1.ImageGenerationService/GetGeneration"
LIST_IMAGES = "/imagegen.v1.ImageLibraryService/ListImages"
#: Each served method's bare SQL, as the client process names it (see _client).
SQL_OF = {GET_IMAGE: "get_image", GET_GENERATION: "get_generation", LIST_IMAGES: "list_images"}
SHORT = {
    ECHO_METHOD: "echo",
    GET_IMAGE: "GetImage",
    GET_GENERATION: "GetGeneration",
    LIST_IMAGES: "ListImages",
}
PAGE_SIZE = 20


# --- the client processes ------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one client process runs: `tasks` loops calling `method` on `target` (a
    gRPC address or a database DSN) with the payloads in turn."""

    kind: str  # "grpc" or "sql"
    target: str
    method: str
    payloads: tuple[bytes, ...]
    metadata: tuple[tuple[str, str], ...]
    tasks: int
    warmup_s: float
    seconds: float


@dataclass
class ClientResult:
    count: int
    latencies: list[float]
    started: float
    ended: float
    errors: int = 0
    first_error: str = ""


def client_process(job: Job, barrier: multiprocessing.synchronize.Barrier, results: Any) -> None:
    asyncio.run(_client(job, barrier, results))


async def _client(job: Job, barrier: multiprocessing.synchronize.Barrier, results: Any) -> None:
    closers: list[Any] = []
    if job.kind == "grpc":
        channel = grpc.aio.insecure_channel(job.target, options=CHANNEL_OPTIONS)
        closers.append(channel.close)
        # Bytes in, bytes out: no serializers, so every method costs the client the same.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(job.method)

        async def once(payload: bytes) -> None:
            await call(payload, metadata=job.metadata, timeout=30)

    else:
        from imagegen.domain.library import ImageQuery
        from imagegen.repositories.db import open_pool
        from imagegen.repositories.generations import GenerationRepository
        from imagegen.repositories.images import ImageRepository, LibraryQueries

        # open_pool's connections are not reset on release: the floor pays no reset either.
        pool = await open_pool(job.target, min_size=job.tasks, max_size=job.tasks)
        closers.append(pool.close)
        images, generations, library = (
            ImageRepository(pool),
            GenerationRepository(pool),
            LibraryQueries(pool),
        )

        async def once(payload: bytes) -> None:
            ident = payload.decode()
            if job.method == "get_image":
                assert await images.get(USER, ident) is not None
            elif job.method == "get_generation":
                assert await generations.get(USER, ident) is not None
                await images.for_generation(ident)
            else:
                await library.list_for_user(USER, ImageQuery(), after=None, limit=PAGE_SIZE + 1)

    latencies: list[float] = []
    errors: list[str] = []

    async def loop(offset: int, until: float, record: bool) -> None:
        n = offset
        while time.perf_counter() < until:
            payload = job.payloads[n % len(job.payloads)]
            n += 1
            began = time.perf_counter()
            try:
                await once(payload)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            if record:
                latencies.append(time.perf_counter() - began)

    warm_until = time.perf_counter() + job.warmup_s
    await asyncio.gather(*(loop(i * 7, warm_until, False) for i in range(job.tasks)))
    errors.clear()
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
    started = time.time()
    until = time.perf_counter() + job.seconds
    await asyncio.gather(*(loop(i * 7, until, True) for i in range(job.tasks)))
    ended = time.time()
    # Reported before the connections close: their database processes must still be
    # there when the server side's CPU is read.
    results.put(
        ClientResult(
            len(latencies), latencies, started, ended, len(errors), errors[0] if errors else ""
        )
    )
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
    for close in closers:
        await close()


# --- the echo ceiling ----------------------------------------------------------------------


def echo_process(ports: Any) -> None:
    asyncio.run(_echo(ports))


async def _echo(ports: Any) -> None:
    async def echo(request: bytes, _context: Any) -> bytes:
        return request

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await server.wait_for_termination()


# --- measuring -----------------------------------------------------------------------------


@dataclass
class Figures:
    label: str
    path: str
    concurrency: int
    count: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    server_cpu_ms: float = float("nan")
    db_cpu_ms: float = float("nan")
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """CPU seconds (user + system, all threads) of each process still running, by pid."""
    seconds: dict[int, float] = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings; a process started in between counts whole."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def postgres_processes(postmaster: psutil.Process) -> list[psutil.Process]:
    return [postmaster, *postmaster.children(recursive=True)]


async def measure(
    label: str,
    path: str,
    job: Job,
    concurrency: int,
    clients: int,
    server: psutil.Process | None,
    postmaster: psutil.Process,
    profile: tuple[Path, int] | None = None,
) -> Figures:
    """Run `job` from `clients` processes sharing `concurrency` loops."""
    context = multiprocessing.get_context("spawn")
    processes = min(clients, concurrency)
    barrier = context.Barrier(processes + 1)
    results = context.Queue()
    share = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    children = [
        context.Process(
            target=client_process,
            args=(Job(**{**job.__dict__, "tasks": tasks}), barrier, results),
            daemon=True,
        )
        for tasks in share
    ]
    for child in children:
        child.start()
    await asyncio.to_thread(barrier.wait)
    server_before = cpu_seconds([server] if server else [])
    db_before = cpu_seconds(postgres_processes(postmaster))
    spy = None
    if profile is not None:
        directory, pid = profile
        spy = subprocess.Popen(
            [
                profile_tool(),
                "record",
                "--pid",
                str(pid),
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "250",
                "--duration",
                str(max(1, int(job.seconds))),
                "--output",
                str(directory / f"{label}-c{concurrency}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    collected: list[ClientResult] = [await asyncio.to_thread(results.get) for _ in children]
    server_after = cpu_seconds([server] if server else [])
    db_after = cpu_seconds(postgres_processes(postmaster))
    await asyncio.to_thread(barrier.wait)  # the clients may close their connections now
    for child in children:
        await asyncio.to_thread(child.join, 30)
    if spy is not None:
        await asyncio.to_thread(spy.wait, 60)
    figures = Figures(label, path, concurrency)
    figures.count = sum(r.count for r in collected)
    figures.seconds = max(r.ended for r in collected) - min(r.started for r in collected)
    figures.latencies = [x for r in collected for x in r.latencies]
    figures.errors = sum(r.errors for r in collected)
    figures.first_error = next((r.first_error for r in collected if r.first_error), "")
    if figures.count:
        if server is not None:
            figures.server_cpu_ms = cpu_used(server_before, server_after) * 1000 / figures.count
        figures.db_cpu_ms = cpu_used(db_before, db_after) * 1000 / figures.count
    return figures


def profile_tool() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def top_functions(raw: Path, limit: int = 18) -> list[tuple[float, float, str]]:
    """(inclusive %, self %, function) from py-spy's collapsed stacks (idle samples are
    not recorded without --idle), the busiest by own samples first."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        # "function (file:line)" -> "function (file)": one entry per function.
        frames = [
            frame.rpartition(":")[0] + ")" if ":" in frame else frame for frame in stack.split(";")
        ]
        count = int(count_text)
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return []
    return [
        (100 * inclusive[name] / total, 100 * own[name] / total, name)
        for name, _ in own.most_common(limit)
    ]


#: Where a profile sample's time goes: checked from the leaf frame up, the first frame
#: that matches a part owns the sample; a sample under the pool's reset is the reset's.
PROFILE_PARTS = (
    (
        "OpenTelemetry",
        (
            "trace/__init__.py",
            "telemetry.py",
            "grpc/_aio_server.py",
            "grpc/_server.py",
            "instrumentation",
            "sampling.py",
            "attributes/__init__.py",
            "context/",
            "_decorator.py",
            "AsyncPGInstrumentor",
            "_hydrate_span",
        ),
    ),
    ("asyncpg", ("asyncpg/connection.py", "asyncpg/pool.py", "asyncpg/protocol")),
    (
        "per-image work",
        (
            "_image_from_row",
            "image_to_proto",
            "PresignedUrlSigner",
            "signed_url",
            "with_url",
            "_signed",
            "replace (dataclasses",
        ),
    ),
    (
        "servicer, service, repository",
        ("api/library.py", "api/generation.py", "services/", "repositories/", "api/convert.py"),
    ),
    ("our interceptors", ("api/interceptors.py",)),
)
CORE = "gRPC core, asyncio, sockets"
RESET = "pool reset on release"


def profile_parts(raw: Path) -> dict[str, float]:
    """% of the samples by part (PROFILE_PARTS; the rest is gRPC's and asyncio's C code,
    the event loop and the sockets)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        if "Connection.reset" in stack:
            counts[RESET] += count
            continue
        for frame in reversed(stack.split(";")):
            owner = next(
                (part for part, marks in PROFILE_PARTS if any(m in frame for m in marks)), None
            )
            if owner is not None:
                counts[owner] += count
                break
        else:
            counts[CORE] += count
    return {part: 100 * counts[part] / total for part in counts} if total else {}


# --- setting up ----------------------------------------------------------------------------


async def seed_library(dsn: str, count: int) -> None:
    """`count` older images of the user (a third of them edits of two others), so the
    tables are not toy-sized; the served reads use the newest ones."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,
                                provider, prompt, is_edit, created_at)
            SELECT gen_random_uuid(), $2, 'generated/bench/old-' || n || '.png', 'image/png',
                   1024, 1024, 200000, 'local', 'an older picture, number ' || n, n % 3 = 0,
                   now() - interval '1 day' - make_interval(secs => n)
              FROM generate_series(1, $1) AS n
            """,
            count,
            USER,
        )
        await conn.execute(
            """
            INSERT INTO image_parents (image_id, parent_id, position)
            SELECT e.id, p.id, p.position
              FROM (SELECT id, row_number() OVER (ORDER BY created_at) AS r
                      FROM images WHERE user_id = $1 AND is_edit) e
              JOIN LATERAL (
                    SELECT id, row_number() OVER () - 1 AS position
                      FROM images
                     WHERE user_id = $1 AND NOT is_edit
                     ORDER BY created_at OFFSET (e.r * 2) % 500 LIMIT 2) p ON true
            """,
            USER,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def generate(
    stub: Any, metadata: Any, spec: common_pb2.GenerationSpec
) -> generation_pb2.GenerationEvent:
    last = None
    async for reply in stub.GenerateImage(
        generation_pb2.GenerateImageRequest(spec=spec), metadata=metadata, timeout=120
    ):
        last = reply.event
    assert last is not None and last.type == generation_pb2.GENERATION_EVENT_TYPE_COMPLETED, last
    event: generation_pb2.GenerationEvent = last
    return event


async def seed_generations(
    address: str, metadata: Any, originals: int, edits: int
) -> tuple[list[str], list[str]]:
    """Generations of two images each through the served process, then edits of two
    of those images each: (generation ids, image ids), the edits' newest."""
    generation_ids: list[str] = []
    image_ids: list[str] = []
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        size = common_pb2.ImageSize(width=256, height=256)

        async def one(spec: common_pb2.GenerationSpec) -> None:
            event = await generate(stub, metadata, spec)
            generation_ids.append(event.generation.removeprefix("generations/"))
            reply = await stub.GetGeneration(
                generation_pb2.GetGenerationRequest(name=event.generation), metadata=metadata
            )
            image_ids.extend(i.name.removeprefix("images/") for i in reply.generation.images)

        for batch in range(0, originals, 4):
            await asyncio.gather(
                *(
                    one(
                        common_pb2.GenerationSpec(prompt=f"a bench picture {n}", size=size, count=2)
                    )
                    for n in range(batch, min(batch + 4, originals))
                )
            )
        sources = list(image_ids)
        for n in range(edits):
            pair = [sources[(2 * n) % len(sources)], sources[(2 * n + 1) % len(sources)]]
            await one(
                common_pb2.GenerationSpec(
                    prompt=("sepia", "grayscale", "border", "mirror")[n % 4],
                    count=2,
                    sources=[common_pb2.ImageSource(image=f"images/{p}") for p in pair],
                )
            )
    return generation_ids, image_ids


async def check_replies(
    address: str, metadata: Any, image_ids: list[str], generation_ids: list[str]
) -> None:
    """Each served read answers as the contract says, and its URLs fetch from S3."""
    async with (
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        library = library_pb2_grpc.ImageLibraryServiceStub(channel)
        jobs = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        got = await library.GetImage(
            library_pb2.GetImageRequest(name=f"images/{image_ids[-1]}"), metadata=metadata
        )
        assert got.image.uri and len(got.image.parents) == 2, got.image
        fetched = await http.get(got.image.uri)
        assert fetched.status_code == 200 and fetched.content[:4] == b"\x89PNG", fetched.status_code
        page = await library.ListImages(
            library_pb2.ListImagesRequest(page_size=PAGE_SIZE), metadata=metadata
        )
        assert len(page.images) == PAGE_SIZE and all(i.uri for i in page.images)
        assert sum(1 for i in page.images if i.parents) >= PAGE_SIZE // 2
        generation = await jobs.GetGeneration(
            generation_pb2.GetGenerationRequest(name=f"generations/{generation_ids[0]}"),
            metadata=metadata,
        )
        assert len(generation.generation.images) == 2 and all(
            i.uri for i in generation.generation.images
        )


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


async def create_bucket(endpoint: str, bucket: str) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1"
    ) as s3:
        await s3.create_bucket(Bucket=bucket)


def start_server(
    tmp: Path, dsn: str, s3_endpoint: str, bucket: str, extra_env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / "ready"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("IMAGEGEN_", "OTEL_", "AWS_", "BUILT_IN"))
        },
        "IMAGEGEN_DATA_DIR": str(tmp / "served"),
        "IMAGEGEN_GRPC_PORT": "0",
        "IMAGEGEN_HTTP_PORT": "0",
        "IMAGEGEN_READY_FILE": str(ready),
        "IMAGEGEN_JWT_KEY": JWT_KEY,
        "IMAGEGEN_WORKERS": "2",
        "IMAGEGEN_LOCAL_STEP_DELAY": "0",
        "IMAGEGEN_LOG_LEVEL": "WARNING",
        "IMAGEGEN_S3_ENDPOINT": s3_endpoint,
        "IMAGEGEN_S3_BUCKET": bucket,
        "IMAGEGEN_PLANS_FILE": str(write_plans(tmp)),
        "DATABASE_URL": dsn,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra_env,
    }
    (tmp / "served").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "served.log", "wb"),
    )
    deadline = time.monotonic() + 120
    while not ready.exists() or not ready.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit((tmp / "served.log").read_text())
        time.sleep(0.05)
    address = dict(p.split("=", 1) for p in ready.read_text().split()[2:])["grpc"]
    return process, address


def write_plans(tmp: Path) -> Path:
    plans = tmp / "plans.json"
    unlimited = {
        "requests_per_hour": None,
        "requests_per_day": None,
        "concurrent": None,
        "monthly_credits": 10_000_000,
    }
    plans.write_text(json.dumps({"plans": {"enterprise": unlimited}}))
    return plans


# --- the run -------------------------------------------------------------------------------


def print_header() -> None:
    print(
        f"{'method':<14}{'C':>4}  {'path':<7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'x echo':>8}{'srv cpu ms':>12}{'db cpu ms':>11}",
        flush=True,
    )


def print_row(figures: Figures, echo: dict[int, Figures]) -> None:
    ceiling = echo.get(figures.concurrency)
    ratio = (
        figures.rate / ceiling.rate
        if ceiling and ceiling.rate and figures.path != "sql"
        else float("nan")
    )
    server = "" if math.isnan(figures.server_cpu_ms) else f"{figures.server_cpu_ms:.3f}"
    errors = f"   {figures.errors} errors, first: {figures.first_error}" if figures.errors else ""
    print(
        f"{figures.label:<14}{figures.concurrency:>4}  {figures.path:<7}{figures.rate:8.0f}"
        f"{figures.pct(0.5):9.2f}{figures.pct(0.99):9.2f}{ratio:8.2f}{server:>12}"
        f"{figures.db_cpu_ms:11.3f}{errors}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,16,64", help="concurrency levels C")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=2, help="client processes (at most C)")
    parser.add_argument("--library", type=int, default=10_000, help="older images seeded by SQL")
    parser.add_argument("--methods", default="echo,GetImage,GetGeneration,ListImages")
    parser.add_argument("--no-sql", action="store_true", help="skip the bare SQL runs")
    parser.add_argument("--profile", type=Path, help="py-spy the server at the highest C into DIR")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra environment variable for the served process (to try a setting)",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    wanted = set(args.methods.split(","))
    load_before = os.getloadavg()

    from imagegen.embedded import postmaster_pid, start_embedded_postgres
    from imagegen.identity import mint_token
    from imagegen.repositories.migrator import apply_migrations

    tmp = Path(tempfile.mkdtemp(prefix="imagegen-readbench-"))
    tmp.chmod(0o755)
    embedded = await start_embedded_postgres(tmp / "pg")
    moto, s3_endpoint = start_moto()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    await create_bucket(s3_endpoint, bucket)
    context = multiprocessing.get_context("spawn")
    echo_ports = context.Queue()
    echo = context.Process(target=echo_process, args=(echo_ports,), daemon=True)
    echo.start()
    echo_address = f"127.0.0.1:{echo_ports.get(timeout=60)}"
    server_process: subprocess.Popen[bytes] | None = None
    try:
        dsn = embedded.dsn
        await apply_migrations(dsn)
        await seed_library(dsn, args.library)
        server_process, address = start_server(
            tmp, dsn, s3_endpoint, bucket, dict(e.split("=", 1) for e in args.server_env)
        )
        token = mint_token(JWT_KEY, user_id=USER, plan="enterprise", lifetime=timedelta(hours=6))
        metadata = (("authorization", f"Bearer {token}"),)
        started = time.perf_counter()
        generation_ids, image_ids = await seed_generations(
            address, metadata, originals=12, edits=10
        )
        print(
            f"seeded {len(generation_ids)} generations, {len(image_ids)} images "
            f"(+{args.library} older) in {time.perf_counter() - started:.1f}s",
            flush=True,
        )
        await check_replies(address, metadata, image_ids, generation_ids)

        server = psutil.Process(server_process.pid)
        pid = postmaster_pid(tmp / "pg" / "postgres")
        assert pid is not None, "the embedded PostgreSQL wrote no postmaster.pid"
        postmaster = psutil.Process(pid)
        requests = {
            ECHO_METHOD: tuple(
                library_pb2.GetImageRequest(name=f"images/{i}").SerializeToString()
                for i in image_ids
            ),
            GET_IMAGE: tuple(
                library_pb2.GetImageRequest(name=f"images/{i}").SerializeToString()
                for i in image_ids
            ),
            GET_GENERATION: tuple(
                generation_pb2.GetGenerationRequest(name=f"generations/{g}").SerializeToString()
                for g in generation_ids
            ),
            LIST_IMAGES: (library_pb2.ListImagesRequest(page_size=PAGE_SIZE).SerializeToString(),),
        }
        sql_payloads = {
            GET_IMAGE: tuple(i.encode() for i in image_ids),
            GET_GENERATION: tuple(g.encode() for g in generation_ids),
            LIST_IMAGES: (b"",),
        }
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        results: list[Figures] = []
        echo_figures: dict[int, Figures] = {}
        print_header()
        for method in (ECHO_METHOD, GET_IMAGE, GET_GENERATION, LIST_IMAGES):
            label = SHORT[method]
            if label not in wanted:
                continue
            for concurrency in levels:
                target, process = (
                    (echo_address, psutil.Process(echo.pid))
                    if method == ECHO_METHOD
                    else (address, server)
                )
                job = Job(
                    "grpc",
                    target,
                    method,
                    requests[method],
                    metadata,
                    concurrency,
                    args.warmup,
                    args.seconds,
                )
                profile = None
                if args.profile and concurrency == max(levels) and method != ECHO_METHOD:
                    profile = (args.profile, server_process.pid)
                figures = await measure(
                    label,
                    "grpc" if method == ECHO_METHOD else "served",
                    job,
                    concurrency,
                    args.clients,
                    process,
                    postmaster,
                    profile,
                )
                results.append(figures)
                if method == ECHO_METHOD:
                    echo_figures[concurrency] = figures
                print_row(figures, echo_figures)
                if method != ECHO_METHOD and not args.no_sql:
                    sql_job = Job(
                        "sql",
                        dsn,
                        SQL_OF[method],
                        sql_payloads[method],
                        (),
                        concurrency,
                        args.warmup,
                        args.seconds,
                    )
                    sql = await measure(
                        label, "sql", sql_job, concurrency, args.clients, None, postmaster
                    )
                    results.append(sql)
                    print_row(sql, echo_figures)
        load_after = os.getloadavg()
        print()
        print(
            f"imagegen read benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
            f"{os.cpu_count()} cores  python {platform.python_version()}  "
            f"clients={args.clients} processes  {args.seconds:g}s per run"
        )
        print(
            "load average before: "
            + " ".join(f"{x:.2f}" for x in load_before)
            + "   after: "
            + " ".join(f"{x:.2f}" for x in load_after)
        )
        print_header()
        for figures in results:
            print_row(figures, echo_figures)
        if args.profile:
            raws = sorted(args.profile.glob("*.txt"))
            shares = [profile_parts(raw) for raw in raws]
            print("\nprofile of the server, % of samples by part:")
            print(f"  {'':32}" + "".join(f"{raw.stem:>18}" for raw in raws))
            for part in (CORE, *(name for name, _ in PROFILE_PARTS), RESET):
                print(f"  {part:32}" + "".join(f"{share.get(part, 0.0):18.1f}" for share in shares))
            for raw in raws:
                print(
                    f"\nprofile of the server, {raw.stem} (inclusive %, self %, busiest by self):"
                )
                for inclusive, own, name in top_functions(raw):
                    print(f"  {inclusive:5.1f} {own:5.1f}  {name}")
    finally:
        if server_process is not None:
            server_process.terminate()
            server_process.wait(timeout=60)
        echo.terminate()
        moto.stop()
        await embedded.stop()
        # The database and the served data directory: some 40 MiB per run.
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
