"""The one way private files (keys) are made in the data directory."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from imagegen.private_files import read_or_create_private


def test_made_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "a.key"
    assert read_or_create_private(path, lambda: "first", what="a key") == "first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_or_create_private(path, lambda: "second", what="a key") == "first"
    assert [p.name for p in path.parent.iterdir()] == ["a.key"]  # no temporary left


def test_a_readable_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "a.key"
    path.write_text("kept")
    path.chmod(0o644)
    assert read_or_create_private(path, lambda: "new", what="a key") == "kept"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_racing_creators_all_read_the_winners_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "raced.key"
    start = threading.Barrier(8)
    seen: list[str] = []

    def create(n: int) -> None:
        start.wait()
        seen.append(read_or_create_private(path, lambda: f"writer-{n}" * 1000, what="a key"))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8 and len(set(seen)) == 1
    assert seen[0] == path.read_text() and len(seen[0]) == len("writer-0") * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["raced.key"]
