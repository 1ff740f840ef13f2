"""Whether the ports a served process listens on can be had, asked before anything starts.

A busy port used to surface as a raw traceback after the embedded PostgreSQL had started.
`ensure_ports_free` tries each listening address the way the servers will bind it (with
SO_REUSEADDR, so a port left in TIME_WAIT by a previous run is not mistaken for busy) and
raises PortUnavailable naming the setting to change; the servers' own bind failures are
turned into the same error, for a port taken in between.
"""

from __future__ import annotations

import errno
import socket

from imagegen.config import Settings


class PortUnavailable(RuntimeError):
    """A listening address cannot be bound; the message is one line naming the setting."""

    def __init__(self, setting: str, host: str, port: int, reason: str) -> None:
        self.setting = setting
        super().__init__(
            f"{setting}={port}: cannot listen on {_shown(host, port)} ({reason}); "
            f"stop whatever holds it or set {setting} to a free port"
        )


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use, by another imagegen serve or another program"
    if exc.errno == errno.EACCES:
        return "permission denied: ports below 1024 need privileges"
    return exc.strerror or str(exc)


def ensure_port_free(setting: str, host: str, port: int) -> None:
    """Raise PortUnavailable if `host:port` cannot be bound now; port 0 always can."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise PortUnavailable(setting, host, port, f"the host does not resolve: {exc}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    continue  # e.g. ::1 on a host without IPv6; the server skips it too
                raise PortUnavailable(setting, host, port, _reason(exc)) from None


def ensure_ports_free(settings: Settings) -> None:
    """Check the gRPC, HTTP and (when set) MCP ports of `settings` before any server
    starts."""
    ensure_port_free("IMAGEGEN_GRPC_PORT", settings.host, settings.grpc_port)
    if settings.http_port != 0 and settings.http_port == settings.grpc_port:
        raise PortUnavailable(
            "IMAGEGEN_HTTP_PORT", settings.host, settings.http_port, "IMAGEGEN_GRPC_PORT has it"
        )
    ensure_port_free("IMAGEGEN_HTTP_PORT", settings.host, settings.http_port)
    if settings.mcp.port is not None:
        ensure_port_free("IMAGEGEN_MCP_PORT", settings.host, settings.mcp.port)


def bind_failure(setting: str, host: str, port: int, exc: BaseException) -> PortUnavailable:
    """The PortUnavailable for a server's own bind failure (the port taken meanwhile)."""
    reason = _reason(exc) if isinstance(exc, OSError) else "the port is in use or not permitted"
    return PortUnavailable(setting, host, port, reason)
