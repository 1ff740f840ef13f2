"""Readiness: one state behind both probes, so gRPC health (grpc.health.v1) and HTTP
`/readyz` never disagree.

Not ready until the composition root has applied migrations, started the notification
listener, the workers and the gRPC server; not ready again from the first moment of a
drain. Liveness (`/healthz`) is another matter: it holds during a drain, while the
process finishes its work.
"""

from __future__ import annotations

from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2


class Readiness:
    """Whether this replica takes new work; kept in step with gRPC health for `services`
    ("" is the whole server)."""

    def __init__(self, health_servicer: health.aio.HealthServicer, services: Sequence[str]):
        self._health = health_servicer
        self._services = tuple(services)
        self._ready = False

    @property
    def ready(self) -> bool:
        """What `/readyz` answers: True only between `serving()` and `draining()`."""
        return self._ready

    async def serving(self) -> None:
        """Everything is up: both probes say ready."""
        for name in self._services:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._ready = True

    async def draining(self) -> None:
        """A drain begins: both probes say not ready, `/readyz` first (it cannot lag)."""
        self._ready = False
        for name in self._services:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
