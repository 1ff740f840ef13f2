"""End to end: a second `imagegen serve` on a busy port says so in one line naming the
setting, exits non-zero, and leaves no PostgreSQL of its own running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagegen.embedded import postmaster_pid
from tests.conftest import postgres_friendly_dir
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e

#: A refusal needs no database and no server: far below this.
EXIT_LIMIT_S = 60


async def serve_once(first: ServedProcess, data_dir: Path, **ports: str) -> tuple[int, str]:
    env = {k: v for k, v in first.env.items() if k != "IMAGEGEN_READY_FILE"}
    env.update({"IMAGEGEN_DATA_DIR": str(data_dir), "IMAGEGEN_GRPC_PORT": "0"})
    env.update({"IMAGEGEN_HTTP_PORT": "0", **ports})
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "imagegen.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_LIMIT_S,
    )
    return done.returncode, done.stdout + done.stderr


def one_line_naming(output: str, setting: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert setting in lines[0] and "in use" in lines[0], lines[0]
    return lines[0]


async def test_a_second_serve_on_a_busy_port_exits_with_one_line(
    tmp_path: Path, pg_data_dir: Path
) -> None:
    shared = pg_data_dir / "data"
    first = await start_server(tmp_path, None, name="first", data_dir=shared)
    try:
        grpc_port = first.grpc_address.rsplit(":", 1)[1]
        http_port = first.http_address.rsplit(":", 1)[1]
        pgdata = shared / "postgres"
        postmaster = postmaster_pid(pgdata)
        assert postmaster is not None

        # Same data directory, busy gRPC port: the shared PostgreSQL is not touched.
        code, output = await serve_once(first, shared, IMAGEGEN_GRPC_PORT=grpc_port)
        assert code != 0
        assert one_line_naming(output, "IMAGEGEN_GRPC_PORT").startswith(
            f"imagegen: IMAGEGEN_GRPC_PORT={grpc_port}: cannot listen on"
        )
        assert json.loads((pgdata / ".handle_pids.json").read_text()) == [first.process.pid]
        assert postmaster_pid(pgdata) == postmaster and psutil.pid_exists(postmaster)
        async with first.channel() as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # A data directory of its own, busy HTTP port: no PostgreSQL is ever started.
        with postgres_friendly_dir() as own:
            code, output = await serve_once(first, own, IMAGEGEN_HTTP_PORT=http_port)
            assert code != 0
            one_line_naming(output, "IMAGEGEN_HTTP_PORT")
            assert postmaster_pid(own / "postgres") is None
            assert not (own / "postgres").exists()
    finally:
        first.terminate()
        await first.wait_exit(EXIT_LIMIT_S)


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A plain listening socket on a loopback port, for the port to be busy."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


async def test_a_port_taken_after_the_check_still_gives_one_line(
    tmp_path: Path, pg_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race the early check cannot close: the port is taken between the check and
    # the bind, after the embedded PostgreSQL has started. It is stopped again.
    from imagegen import server as server_module
    from imagegen.ports import PortUnavailable
    from tests.inprocess import serve_in_process

    monkeypatch.setattr(server_module, "ensure_ports_free", lambda settings: None)
    with busy_port() as busy:
        with pytest.raises(PortUnavailable, match="IMAGEGEN_GRPC_PORT") as caught:
            async with serve_in_process(
                pg_data_dir, "", env={"DATABASE_URL": "", "IMAGEGEN_GRPC_PORT": str(busy)}
            ):
                pass
    assert "\n" not in str(caught.value)
    pgdata = pg_data_dir / "data" / "postgres"
    assert (pgdata / "PG_VERSION").exists(), "the embedded PostgreSQL had started"
    pid = postmaster_pid(pgdata)
    assert pid is None or not psutil.pid_exists(pid), "and was stopped again"


async def test_a_busy_mcp_port_gives_one_line_and_leaves_no_worker_running(
    tmp_path: Path, pg_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen import server as server_module
    from imagegen.ports import PortUnavailable
    from tests.inprocess import serve_in_process

    first = await start_server(tmp_path, None, name="first", data_dir=pg_data_dir / "data")
    try:
        with busy_port() as busy, postgres_friendly_dir() as own:
            # Seen by the check before anything starts.
            code, output = await serve_once(first, own, IMAGEGEN_MCP_PORT=str(busy))
            assert code != 0
            one_line_naming(output, "IMAGEGEN_MCP_PORT")
    finally:
        first.terminate()
        await first.wait_exit(EXIT_LIMIT_S)

    # Taken after the check: the MCP server binds last, once the job workers and the
    # webhook worker run; they are stopped with everything else.
    monkeypatch.setattr(server_module, "ensure_ports_free", lambda settings: None)
    with busy_port() as busy:
        with pytest.raises(PortUnavailable, match="IMAGEGEN_MCP_PORT") as caught:
            async with serve_in_process(
                pg_data_dir, "", env={"DATABASE_URL": "", "IMAGEGEN_MCP_PORT": str(busy)}
            ):
                pass
    assert "\n" not in str(caught.value)
    left = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not {"imagegen-claim-loop", "imagegen-webhooks"} & left, left
