"""The port check a served process makes before anything starts."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.config import Settings
from imagegen.ports import PortUnavailable, ensure_port_free, ensure_ports_free


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "localhost"])
def test_a_busy_port_names_its_setting_in_one_line(busy_port: int, host: str) -> None:
    with pytest.raises(PortUnavailable) as caught:
        ensure_port_free("IMAGEGEN_GRPC_PORT", host, busy_port)
    message = str(caught.value)
    assert message.startswith(f"IMAGEGEN_GRPC_PORT={busy_port}: cannot listen on")
    assert "already in use" in message and "\n" not in message
    assert caught.value.setting == "IMAGEGEN_GRPC_PORT"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_free_and_ephemeral_ports_pass() -> None:
    ensure_port_free("IMAGEGEN_HTTP_PORT", "127.0.0.1", 0)
    ensure_port_free("IMAGEGEN_HTTP_PORT", "127.0.0.1", free_port())


def test_both_settings_are_checked(busy_port: int, tmp_path: Path) -> None:
    def settings(grpc_port: int, http_port: int) -> Settings:
        return Settings.from_env(
            {
                "IMAGEGEN_DATA_DIR": str(tmp_path),
                "IMAGEGEN_GRPC_PORT": str(grpc_port),
                "IMAGEGEN_HTTP_PORT": str(http_port),
            }
        )

    with pytest.raises(PortUnavailable, match="IMAGEGEN_HTTP_PORT"):
        ensure_ports_free(settings(0, busy_port))
    with pytest.raises(PortUnavailable, match="IMAGEGEN_GRPC_PORT"):
        ensure_ports_free(settings(busy_port, 0))
    with pytest.raises(PortUnavailable, match=r"IMAGEGEN_HTTP_PORT=.*IMAGEGEN_GRPC_PORT has it"):
        same = free_port()
        ensure_ports_free(settings(same, same))
