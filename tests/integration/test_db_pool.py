"""The connection pool: no reset round trip on release, and a size the database can
hold, whatever the worker count."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen.config import ConfigError
from imagegen.repositories.db import BackendPids, connection_slots, open_pool
from tests.inprocess import serve_in_process
from tests.pgwire import CountingProxy


async def test_releasing_a_connection_sends_nothing(database_url: str) -> None:
    async with CountingProxy.start(database_url) as proxy:
        pool = await open_pool(proxy.dsn, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            after_release = proxy.mark()
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchval("SELECT 2")
            # Only the work itself: BEGIN, the statement, COMMIT; no RESET ALL & co.
            sent = proxy.statements(after_release)
            assert sent == ["BEGIN;", "SELECT 2", "COMMIT;"], sent
        finally:
            await pool.close()


async def test_backend_pids_follow_the_pool(database_url: str) -> None:
    pids = BackendPids()
    pool = await open_pool(database_url, min_size=2, max_size=2, backend_pids=pids)
    try:
        async with pool.acquire() as conn:
            assert conn.get_server_pid() in pids
        assert len(pids) == 2
    finally:
        await pool.close()
    # A closed connection's pid is forgotten before PostgreSQL can give it to another.
    assert len(pids) == 0


async def test_connection_slots_reads_the_server_settings(database_url: str) -> None:
    pool = await open_pool(database_url, max_size=1)
    try:
        max_connections, usable = await connection_slots(pool)
    finally:
        await pool.close()
    assert 0 < usable < max_connections


async def test_a_pool_larger_than_the_database_allows_is_refused(
    tmp_path: Path, database_url: str
) -> None:
    with pytest.raises(ConfigError, match="IMAGEGEN_DB_POOL_SIZE=100000"):
        async with serve_in_process(
            tmp_path,
            database_url,
            env={"IMAGEGEN_DB_POOL_SIZE": "100000", "IMAGEGEN_WORKERS": "64"},
        ):
            pass
