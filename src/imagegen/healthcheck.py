"""`imagegen health`: ask a server's grpc.health.v1 service whether it is SERVING.

The container image's HEALTHCHECK runs it, so the image needs no separate probe
binary. SERVING is the only healthy answer: NOT_SERVING (a draining server), an
unknown service name, nothing listening and a timeout all count as unhealthy.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

DEFAULT_TIMEOUT_S = 3.0
_ANY_ADDRESS = ("0.0.0.0", "", "::", "[::]")


@dataclass(frozen=True)
class HealthAnswer:
    """What one check found: whether the service is SERVING, and a line saying so."""

    serving: bool
    detail: str


def local_address(host: str, grpc_port: int) -> str:
    """The address a probe inside the server's own container or pod dials: loopback
    when the server binds every interface, else the bound host."""
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{grpc_port}"


def check_health(
    address: str, service: str = "", *, timeout: float = DEFAULT_TIMEOUT_S
) -> HealthAnswer:
    """One grpc.health.v1 Check of `service` ("" is the whole server) at `address`,
    bounded by `timeout` seconds; never raises for an unreachable server."""
    # A probe must reach the address it was given, never a proxy from the environment.
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(address, options=options) as channel:
        # The typing stubs give HealthStub no methods; the multicallable is typed.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            return HealthAnswer(False, f"{address}: {name}: {_details(exc)}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthAnswer(reply.status == health_pb2.HealthCheckResponse.SERVING, status)


def _details(exc: grpc.RpcError) -> str:
    details = exc.details() if isinstance(exc, grpc.Call) else None
    return details or "no details"
