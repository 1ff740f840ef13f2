"""Connection pools and the one place that knows how asyncpg is set up."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import asyncpg

#: Where a repository sends its statements: the pool (each statement on its own, committed
#: at once) or the connection of a unit of work (inside its transaction).
Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection


class BackendPids:
    """The server process ids of a pool's open connections.

    A NOTIFY carries the pid of the backend that sent it; the notification listener
    (jobs/signals.py) ignores those sent by this process's own connections, whose
    changes were already signalled in memory. A pid leaves the set when its connection
    closes, before PostgreSQL can give it to another client's backend."""

    def __init__(self) -> None:
        self._pids: set[int] = set()

    def __contains__(self, pid: object) -> bool:
        return pid in self._pids

    def __len__(self) -> int:
        return len(self._pids)

    def track(self, conn: asyncpg.Connection) -> None:
        """Remember `conn`'s backend pid until the connection closes (or is lost)."""
        pid = conn.get_server_pid()
        self._pids.add(pid)
        conn.add_termination_listener(lambda _conn: self._pids.discard(pid))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come and go as Python objects, not JSON text.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing.

    asyncpg's default reset sends `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release (a round trip, four statements). Our pooled connections
    never hold session state for it to clear: advisory locks are transaction-scoped
    (`pg_advisory_xact_lock`, released at COMMIT or ROLLBACK), no cursor outlives its
    transaction, nothing LISTENs on a pooled connection (the listener has its own
    connection) and no statement changes a session setting (`SET` without `LOCAL`).
    asyncpg still rolls back a transaction left open before it calls this."""


async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    backend_pids: BackendPids | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose connections speak jsonb as Python objects and are not reset on
    release; with `backend_pids`, their pids are tracked there. The caller closes it."""

    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        if backend_pids is not None:
            backend_pids.track(conn)

    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
        reset=_keep_session,
        command_timeout=30,
        **kwargs,
    )
    return pool


async def connection_slots(pool: asyncpg.Pool) -> tuple[int, int]:
    """The server's `max_connections`, and how many of them ordinary roles may use
    (less the slots reserved for superusers and for `pg_use_reserved_connections`)."""
    row = await pool.fetchrow(
        "SELECT current_setting('max_connections')::int AS max, "
        "current_setting('superuser_reserved_connections')::int "
        "+ coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved"
    )
    return int(row["max"]), int(row["max"]) - int(row["reserved"])


@contextlib.asynccontextmanager
async def transaction(db: Executor) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on `db`: a pooled connection's own, or a savepoint inside the
    transaction a unit of work's connection already has."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db
