"""Dropping embedded-PostgreSQL users that died without leaving (no server needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from imagegen.embedded import USERS_FILE, drop_stale_users, join_users


class PidList:
    """The wheel's DiskList in memory: `get` and `put` of a list of pids."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)

    def get(self) -> list[int]:
        return list(self.pids)

    def put(self, values: list[int]) -> None:
        self.pids = list(values)


class FakeServer:
    def __init__(self, pids: list[int]) -> None:
        self._lock = threading.Lock()
        self.global_process_id_list = PidList(pids)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_gone_zombie_and_reused_pids_are_dropped_live_ones_kept(tmp_path: Path) -> None:
    users_file = tmp_path / USERS_FILE
    gone = _sleeper()
    gone.kill()
    gone.wait()
    zombie = _sleeper()
    zombie.kill()
    # Wait for its death without reaping it: it stays a zombie, as a killed replica does
    # under a parent that has not waited for it yet.
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
    live = _sleeper()
    reused = _sleeper()
    try:
        # `reused` stands for a new process that took a dead user's pid: the start time
        # recorded for that pid is not its own.
        started = psutil.Process(reused.pid).create_time()
        users_file.write_text(json.dumps({str(reused.pid): started - 3600}))
        server = FakeServer([gone.pid, zombie.pid, live.pid, reused.pid, os.getpid()])
        join_users(server, users_file)

        stale = drop_stale_users(server, users_file)

        assert sorted(stale) == sorted([gone.pid, zombie.pid, reused.pid])
        assert server.global_process_id_list.pids == [live.pid, os.getpid()]
        assert set(json.loads(users_file.read_text())) == {str(os.getpid())}
        assert drop_stale_users(server, users_file) == []
    finally:
        for process in (zombie, live, reused):
            process.kill()
            process.wait()


def test_an_unknown_library_is_left_to_count_alone(tmp_path: Path) -> None:
    assert drop_stale_users(object(), tmp_path / USERS_FILE) == []
