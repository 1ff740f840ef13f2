"""Benchmark: what a served process keeps of edit sources it refuses for their size.

Starts `imagegen serve` (embedded PostgreSQL, local blob store, `local` provider) and
sends SubmitGeneration edits whose one source is just over IMAGEGEN_MAX_INPUT_BYTES,
alternately as raw bytes and as a base64 `data:` URL, then reads the process's resident
memory (VmRSS) before, after every few refusals and at the end. Each refusal must be
IMG_007 with an ErrorInfo (not a transport RESOURCE_EXHAUSTED). Prints figures; asserts
nothing.

The direct path, in the same run: a bare grpc.aio server (no job, no database, only
imagegen's memory interceptor and allocator policy of api/memory.py) that only parses the
same SubmitGeneration messages and refuses them, so the figures separate what grpcio keeps
of large messages from what imagegen keeps. `--mmap-threshold` sets both servers'
IMAGEGEN_MALLOC_MMAP_THRESHOLD (0: glibc's own policy).

    .venv/bin/python bench/oversize_bench.py [--refusals 20] [--max-input-mb 20]
        [--mmap-threshold 4194304]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from imagegen.identity import mint_token

JWT_KEY = "bench-signing-key-0123456789abcdef0123456789abcdef"
CHANNEL_OPTIONS = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has ended (no VmRSS)")


def start_server(
    root: Path, max_input_bytes: int, mmap_threshold: int
) -> tuple[subprocess.Popen[bytes], str]:
    ready = root / "ready"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGEN_", "OTEL_"))},
        "IMAGEGEN_DATA_DIR": str(root / "data"),
        "IMAGEGEN_GRPC_PORT": "0",
        "IMAGEGEN_HTTP_PORT": "0",
        "IMAGEGEN_READY_FILE": str(ready),
        "IMAGEGEN_JWT_KEY": JWT_KEY,
        **{
            k: os.environ[k]
            for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_")
            if k in os.environ
        },
        "IMAGEGEN_MAX_INPUT_BYTES": str(max_input_bytes),
        "IMAGEGEN_MALLOC_MMAP_THRESHOLD": str(mmap_threshold),
        "IMAGEGEN_PLANS_FILE": str(Path(__file__).parents[1] / "tests/data/plans-unlimited.json"),
    }
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve"], env=env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 120
    while not (ready.exists() and ready.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((root / "server.log").read_text())
        time.sleep(0.1)
    parts = dict(p.split("=", 1) for p in ready.read_text().split()[2:])
    return process, parts["grpc"]


BARE_SERVER = """
import asyncio, sys
import grpc
from imagegen.api.memory import HeapTrimmer, LargeRequestInterceptor, apply_malloc_policy
from imagegen.v1 import generation_pb2

async def main():
    # The same allocator policy, and the same collection and trim after large requests
    # (api/memory.py, its one interceptor), as the served process.
    apply_malloc_policy(int(sys.argv[2]))
    trimmer = HeapTrimmer()

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too large")

    handler = grpc.method_handlers_generic_handler(
        "imagegen.v1.ImageGenerationService",
        {"SubmitGeneration": grpc.unary_unary_rpc_method_handler(
            refuse,
            request_deserializer=generation_pb2.SubmitGenerationRequest.FromString,
            response_serializer=lambda b: b,
        )},
    )
    server = grpc.aio.server(
        interceptors=[LargeRequestInterceptor(trimmer)],
        options=[("grpc.max_receive_message_length", int(sys.argv[1]))],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def start_bare_server(
    receive_limit: int, mmap_threshold: int
) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, str(receive_limit), str(mmap_threshold)],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    port = process.stdout.readline().decode().strip()
    return process, f"127.0.0.1:{port}"


async def refusals(
    address: str,
    pid: int,
    sources: list[common_pb2.ImageSource],
    metadata: tuple[tuple[str, str], ...],
) -> tuple[float, float, dict[str, int], list[float]]:
    """(RSS before, RSS after, answers, RSS every five refusals) for one server."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        # Warm every path a refusal takes with small requests refused the same way.
        for _ in range(2):
            small = common_pb2.GenerationSpec(
                prompt="grayscale", sources=[common_pb2.ImageSource(data=b"not an image")]
            )
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.SubmitGeneration(
                    generation_pb2.SubmitGenerationRequest(spec=small), metadata=metadata
                )
        await asyncio.sleep(1)
        before = rss_mib(pid)
        codes: dict[str, int] = {}
        steps = []
        for n, source in enumerate(sources, start=1):
            spec = common_pb2.GenerationSpec(prompt="grayscale", sources=[source])
            try:
                await stub.SubmitGeneration(
                    generation_pb2.SubmitGenerationRequest(spec=spec), metadata=metadata
                )
                code = "OK (not refused!)"
            except grpc.aio.AioRpcError as err:
                code = refused_code(err)
            codes[code] = codes.get(code, 0) + 1
            if n % 5 == 0:
                steps.append(rss_mib(pid))
        # Both servers hand freed heap back a moment after the last large request.
        await asyncio.sleep(2)
        return before, rss_mib(pid), codes, steps


def refused_code(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return f"{err.code().name}/{info.reason}"
    return f"{err.code().name}/(no ErrorInfo)"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refusals", type=int, default=20)
    parser.add_argument("--max-input-mb", type=int, default=20)
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=4 * 1024 * 1024,
        help="IMAGEGEN_MALLOC_MMAP_THRESHOLD of both servers (0: glibc's own policy)",
    )
    args = parser.parse_args()
    limit = args.max_input_mb * 1024 * 1024
    # Just over the limit (half a MiB), like a 21 MB photo against the 20 MiB default.
    oversize = os.urandom(limit + 512 * 1024)
    as_data_url = "data:image/png;base64," + base64.b64encode(oversize).decode()
    sources = [
        common_pb2.ImageSource(data=oversize) if n % 2 else common_pb2.ImageSource(uri=as_data_url)
        for n in range(1, args.refusals + 1)
    ]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; limit {limit} bytes, each "
        f"source {len(oversize)} bytes, {args.refusals} refusals (bytes and data: URLs in turn), "
        f"mmap threshold {args.mmap_threshold or 'glibc'}"
    )
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        bare, bare_address = start_bare_server(limit * 4 // 3 + 1024 * 1024, args.mmap_threshold)
        served, address = start_server(root, limit, args.mmap_threshold)
        try:
            token = mint_token(JWT_KEY, user_id="bench", plan="pro")
            metadata = (("authorization", f"Bearer {token}"),)
            rows = [
                ("direct (bare grpc.aio)", *await refusals(bare_address, bare.pid, sources, ())),
                ("served (imagegen)", *await refusals(address, served.pid, sources, metadata)),
            ]
        except RuntimeError:
            print(f"bare server exit {bare.poll()}, served exit {served.poll()}; served log:")
            print((root / "server.log").read_text()[-4000:])
            raise
        finally:
            for process in (served, bare):
                process.terminate()
                process.wait(timeout=60)
    print(f"{'path':24} {'before':>9} {'peak':>9} {'after':>9} {'kept':>9}   answers")
    for name, before, after, codes, steps in rows:
        answers = ", ".join(f"{k} x{v}" for k, v in sorted(codes.items()))
        print(
            f"{name:24} {before:7.1f}Mi {max(steps, default=after):7.1f}Mi {after:7.1f}Mi "
            f"{after - before:+7.1f}Mi   {answers}"
        )


if __name__ == "__main__":
    asyncio.run(main())
