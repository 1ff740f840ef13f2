"""Private files a process makes once in its data directory and every later process
reads: the development JWT key, the local blob store's URL-signing key, the webhook
secrets' sealing key and the development C2PA bundle.

One way to make them, because each is a secret two processes may race to create
(`imagegen serve` beside `imagegen token`, two replicas on one volume): the content is
written to a private temporary file, synced, and hard-linked into place. The link fails
for the process that lost the race, so both read the winner's complete file and nobody
ever reads half of one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def read_or_create_private(path: Path, make: Callable[[], str], *, what: str) -> str:
    """The text of the private file at `path`, made from `make()` (mode 0600) when it
    does not exist yet. A file others may read has its mode tightened to 0600 first,
    with a warning: these files hold keys. `what` names the file in log lines."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        _create(path, make(), what)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("tightening permissions of %s (%s) from %o to 600", path, what, mode)
        path.chmod(0o600)
    return path.read_text()


def _create(path: Path, content: str, what: str) -> None:
    # mkstemp makes the file 0600 and opens it exclusively.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
            log.info("created %s at %s", what, path)
    finally:
        os.unlink(temporary)
