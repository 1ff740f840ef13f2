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


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come and go as Python objects, not JSON text.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def open_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    """A pool whose connections speak jsonb as Python objects; the caller closes it."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=30,
        **kwargs,
    )
    return pool


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
