"""End to end: `imagegen health` (the image's HEALTHCHECK) against a served process,
during its drain, and against nothing listening; while the drain waits for a running
job, `/healthz` (the Kubernetes liveness probe in deploy/kubernetes/) stays 200 and
`/readyz` answers 503 like gRPC health, and the drain logs nothing alarming."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.v1 import common_pb2, generation_pb2

from imagegen.healthcheck import local_address
from tests.served import start_server

pytestmark = pytest.mark.e2e
E = generation_pb2


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}


async def run_health(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "imagegen.cli", "health", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_health_is_zero_when_serving_and_one_for_an_unknown_service(
    tmp_path: Path, database_url: str
) -> None:
    server = await start_server(tmp_path, database_url)
    try:
        whole = await run_health(server.env, "--addr", server.grpc_address)
        assert (whole.returncode, whole.stdout.strip()) == (0, "SERVING"), whole.stderr

        # With no --addr it dials IMAGEGEN_HOST:IMAGEGEN_GRPC_PORT, as in the container.
        port = server.grpc_address.rsplit(":", 1)[1]
        by_settings = await run_health({**server.env, "IMAGEGEN_GRPC_PORT": port})
        assert by_settings.returncode == 0, by_settings.stderr

        named = await run_health(
            server.env,
            "--addr",
            server.grpc_address,
            "--service",
            "imagegen.v1.ImageGenerationService",
        )
        assert named.returncode == 0, named.stderr

        # A bad setting is unhealthy (1), never Docker's reserved 2.
        misconfigured = await run_health({**server.env, "IMAGEGEN_GRPC_PORT": "seventy"})
        assert misconfigured.returncode == 1
        assert "IMAGEGEN_GRPC_PORT" in misconfigured.stderr

        unknown = await run_health(
            server.env, "--addr", server.grpc_address, "--service", "no.such.Service"
        )
        assert unknown.returncode == 1
        assert "NOT_FOUND" in unknown.stderr
    finally:
        server.kill()


async def test_health_is_one_and_readyz_503_while_draining_and_healthz_stays_200(
    tmp_path: Path, database_url: str
) -> None:
    grace = 15.0
    server = await start_server(
        tmp_path,
        database_url,
        # Four stages of 1.5 s: the job outlasts the checks below by a wide margin.
        extra_env={"IMAGEGEN_SHUTDOWN_GRACE": str(grace), "IMAGEGEN_LOCAL_STEP_DELAY": "1.5"},
    )
    try:
        async with server.channel() as channel:
            stub = server.stub(channel)
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
            async with httpx.AsyncClient(trust_env=False) as http:
                ready = await http.get(f"http://{server.http_address}/readyz", timeout=5)
            assert ready.status_code == 200
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            server.terminate()
            drained = await watch.read()
            assert drained.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

            # The job still runs, so the drain is still waiting: liveness holds...
            async with httpx.AsyncClient(trust_env=False) as http:
                live = await http.get(f"http://{server.http_address}/healthz", timeout=5)
                ready = await http.get(f"http://{server.http_address}/readyz", timeout=5)
            assert live.status_code == 200
            # ...readiness over HTTP says what gRPC health says...
            assert ready.status_code == 503
            # ...while the HEALTHCHECK (readiness) says the server is going away.
            draining = await run_health(server.env, "--addr", server.grpc_address)
            assert draining.returncode == 1
            assert "NOT_SERVING" in draining.stderr
            assert not running.done()

            await asyncio.wait_for(running, timeout=grace + 5)
            assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        assert await server.wait_exit(grace + 4) == 0, server.log_text()
        # A clean drain: no ERROR line, no task left pending.
        assert server.log_problems() == []
    finally:
        server.kill()


async def test_health_is_one_within_its_timeout_when_nothing_listens(tmp_path: Path) -> None:
    # A port that was free a moment ago: bound, read, closed.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    result = await run_health(clean_env(), "--addr", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
    # Configured 2 s; a generous margin for interpreter start on a loaded machine.
    assert time.monotonic() - began < 30


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("0.0.0.0", "127.0.0.1:50051"),
        ("::", "127.0.0.1:50051"),
        ("127.0.0.1", "127.0.0.1:50051"),
        ("::1", "[::1]:50051"),
        ("imagegen.internal", "imagegen.internal:50051"),
    ],
)
def test_local_address_dials_loopback_for_a_wildcard_bind(host: str, address: str) -> None:
    assert local_address(host, 50051) == address
