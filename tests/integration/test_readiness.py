"""Readiness (api/health.py) over real HTTP and gRPC health: `/readyz` is 503 until
start-up completes, then `/readyz` and grpc.health.v1 say the same thing while serving
and from a drain on; `/healthz` stays 200 throughout."""

from __future__ import annotations

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imagegen.api.health import Readiness
from imagegen.api.http import build_http_app, start_http_server

SERVICES = ("", "imagegen.v1.ImageGenerationService")


async def test_readyz_and_grpc_health_move_together() -> None:
    health_servicer = health.aio.HealthServicer()
    readiness = Readiness(health_servicer, SERVICES)
    grpc_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    runner, http_port = await start_http_server(
        build_http_app(
            local_store=None,
            metrics_text=lambda: (b"", "text/plain"),
            is_ready=lambda: readiness.ready,
        ),
        "127.0.0.1",
        0,
    )
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{grpc_port}", options=[("grpc.enable_http_proxy", 0)]
    )
    stub = health_pb2_grpc.HealthStub(channel)

    async def http_probes() -> tuple[int, int]:
        async with httpx.AsyncClient(trust_env=False) as http:
            live = await http.get(f"http://127.0.0.1:{http_port}/healthz")
            ready = await http.get(f"http://127.0.0.1:{http_port}/readyz")
        return live.status_code, ready.status_code

    async def probes() -> tuple[int, int, list[int]]:
        statuses = []
        for name in SERVICES:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            statuses.append(reply.status)
        return (*await http_probes(), statuses)

    try:
        # Start-up not finished (migrations, listener, workers): /readyz says so. (The
        # server starts gRPC only once everything is up, so its health is not asked yet.)
        assert await http_probes() == (200, 503)

        await readiness.serving()
        assert await probes() == (200, 200, [health_pb2.HealthCheckResponse.SERVING] * 2)

        await readiness.draining()
        assert await probes() == (200, 503, [health_pb2.HealthCheckResponse.NOT_SERVING] * 2)
    finally:
        await channel.close()
        await runner.cleanup()
        await grpc_server.stop(None)
