"""End to end: the README path (serve with no configuration, then `imagegen generate`)
and a graceful SIGTERM while a generation runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.v1 import common_pb2, generation_pb2
from PIL import Image

from tests.served import start_server

pytestmark = pytest.mark.e2e
E = generation_pb2


async def test_unconfigured_serve_then_cli_generate_writes_a_png(
    tmp_path: Path, pg_data_dir: Path
) -> None:
    # No DATABASE_URL, no S3, no JWT key: the embedded default, as a newcomer runs it.
    server = await start_server(
        pg_data_dir,
        database_url="",
        extra_env={"IMAGEGEN_JWT_KEY": "", "DATABASE_URL": "", "IMAGEGEN_URL_TTL": "3"},
    )
    try:
        out = tmp_path / "images"
        env = {**server.env, "IMAGEGEN_ADDR": server.grpc_address}
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "imagegen.cli",
                "generate",
                "a red fox in snow",
                "--style",
                "artistic",
                "--size",
                "256x256",
                "--out",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "%" in result.stderr, "a progress bar was drawn"
        files = list(out.iterdir())
        assert len(files) == 1 and files[0].suffix == ".png"
        with Image.open(files[0]) as image:
            assert image.format == "PNG" and image.size == (256, 256)
        url = next(line for line in result.stdout.splitlines() if line.startswith("http"))
        async with httpx.AsyncClient(trust_env=False) as http:
            reply = await http.get(url)
            assert reply.status_code == 200
            assert reply.content == files[0].read_bytes()
            signature_at = url.index("signature=") + len("signature=")
            flipped = "0" if url[signature_at] != "0" else "1"
            tampered = url[:signature_at] + flipped + url[signature_at + 1 :]
            assert (await http.get(tampered)).status_code == 403
            await asyncio.sleep(4)  # IMAGEGEN_URL_TTL=3
            assert (await http.get(url)).status_code in (403, 410)

        token = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "imagegen.cli", "token", "--user", "alice", "--plan", "pro"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert token.returncode == 0
        assert token.stdout.strip().splitlines()[-1].count(".") == 2
        server.terminate()
        assert await server.wait_exit(60) == 0
        # The CLI goes away once it has the terminal event, mid-stream: no ERROR for that
        # ("Failed to detach context" before), nor anything else on a clean run.
        assert server.log_problems() == []
    finally:
        server.terminate()
        await server.wait_exit(60)


async def test_sigterm_drains_and_lets_the_running_generation_finish(
    tmp_path: Path, database_url: str
) -> None:
    grace = 8.0
    server = await start_server(
        tmp_path,
        database_url,
        extra_env={"IMAGEGEN_SHUTDOWN_GRACE": str(grace), "IMAGEGEN_LOCAL_STEP_DELAY": "0.6"},
    )
    try:
        async with server.channel() as channel:
            stub = server.stub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            started = asyncio.Event()
            events: list[E.GenerationEvent] = []

            async def generate() -> None:
                request = E.GenerateImageRequest(
                    spec=common_pb2.GenerationSpec(
                        prompt="a slow lighthouse",
                        size=common_pb2.ImageSize(width=256, height=256),
                    )
                )
                async for response in stub.GenerateImage(
                    request, metadata=server.metadata(), timeout=60
                ):
                    events.append(response.event)
                    if response.event.type == E.GENERATION_EVENT_TYPE_STARTED:
                        started.set()

            running = asyncio.create_task(generate())
            await asyncio.wait_for(started.wait(), timeout=30)
            signalled_at = time.monotonic()
            server.terminate()

            status = None
            for _ in range(100):
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    status = reply.status
                except grpc.aio.AioRpcError:
                    break
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(spec=common_pb2.GenerationSpec(prompt="too late")),
                    metadata=server.metadata(),
                    timeout=5,
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            await asyncio.wait_for(running, timeout=grace + 5)
            assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        # The configured grace of 8 s from SIGTERM, with a generous margin; wait_exit
        # raises if the process is still running then.
        code = await server.wait_exit(signalled_at + grace + 4 - time.monotonic())
        assert code == 0, server.log_text()
    finally:
        server.kill()
