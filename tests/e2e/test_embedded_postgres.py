"""End to end: the embedded PostgreSQL shared by two `imagegen serve` processes on one data
directory is stopped by the last one to leave, even when the other was killed -9."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import psutil
import pytest

from imagegen.embedded import postmaster_pid
from tests.served import start_server

pytestmark = pytest.mark.e2e

#: Short on purpose: a clean stop with nothing running takes well under a second.
SHUTDOWN_GRACE_S = 2
#: The configured limit for the server and its PostgreSQL to be gone after SIGTERM.
STOP_LIMIT_S = 30


def _pids_in_use(pgdata: Path) -> list[int]:
    return [int(pid) for pid in json.loads((pgdata / ".handle_pids.json").read_text())]


async def test_last_live_replica_stops_postgres_after_another_was_killed(
    tmp_path: Path, pg_data_dir: Path
) -> None:
    env = {"IMAGEGEN_SHUTDOWN_GRACE": str(SHUTDOWN_GRACE_S)}
    data_dir = pg_data_dir / "data"
    first = await start_server(tmp_path, None, name="first", data_dir=data_dir, extra_env=env)
    second = None
    try:
        second = await start_server(tmp_path, None, name="second", data_dir=data_dir, extra_env=env)
        pgdata = data_dir / "postgres"
        postmaster = postmaster_pid(pgdata)
        assert postmaster is not None and psutil.pid_exists(postmaster)
        assert set(_pids_in_use(pgdata)) == {first.process.pid, second.process.pid}

        first.kill()
        assert await first.wait_exit(STOP_LIMIT_S) == -9  # reaped: its pid is gone for good
        assert first.process.pid in _pids_in_use(pgdata), "a killed replica cannot leave"

        second.terminate()
        assert await second.wait_exit(STOP_LIMIT_S) == 0, second.log_text()
        server = psutil.Process(postmaster) if psutil.pid_exists(postmaster) else None
        if server is not None:
            await asyncio.to_thread(server.wait, STOP_LIMIT_S)
        assert not psutil.pid_exists(postmaster), "PostgreSQL outlived its last user"
        assert _pids_in_use(pgdata) == []
        assert "ended without leaving" in second.log_text()
    finally:
        for served in (first, second):
            if served is not None:
                served.kill()
                served.process.wait()
        _stop_leftover_postgres(data_dir / "postgres")


def _stop_leftover_postgres(pgdata: Path) -> None:
    """Never leave a server behind, even when the test failed."""
    pid = postmaster_pid(pgdata)
    if pid is not None and psutil.pid_exists(pid) and pid != os.getpid():
        process = psutil.Process(pid)
        if "postgres" in process.name():
            process.terminate()
            process.wait(10)
