"""A PostgreSQL wire-protocol proxy that records what a client sends, for tests that
count statements and round trips at the server's door.

    async with CountingProxy.start(database_url) as proxy:
        ... point the server under test at proxy.dsn ...
        mark = proxy.mark()
        ...
        proxy.since(mark)            # every message sent after the mark
        proxy.round_trips(mark)      # Query and Sync messages: each waits for the server

It relays bytes unchanged in both directions over a unix socket and parses only the
client's side (startup, then typed messages). Counting here cannot be fooled by the
client: whatever reaches PostgreSQL passes through. A Query message is one round trip
(and as many statements as it holds); an extended-protocol exchange (Parse/Bind/
Execute...) is one round trip per Sync, one statement per Execute.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Startup-phase request codes that are not a StartupMessage.
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


@dataclass(frozen=True)
class Sent:
    """One message a client sent: its connection, type byte and, where it has one, SQL."""

    connection: int
    kind: str
    sql: str
    at: float

    @property
    def round_trip(self) -> bool:
        return self.kind in ("Q", "S")

    @property
    def statement(self) -> bool:
        return self.kind in ("Q", "E")


class CountingProxy:
    """See the module docstring."""

    def __init__(self, target_socket: Path, directory: Path, port: int, base_dsn: str) -> None:
        self._target = target_socket
        self._directory = directory
        self._port = port
        self._base_dsn = base_dsn
        self.sent: list[Sent] = []
        self._server: asyncio.AbstractServer | None = None
        self._connections = 0
        self._pumps: set[asyncio.Task[None]] = set()
        self._recorded = asyncio.Condition()

    @property
    def dsn(self) -> str:
        """The DSN of the proxied database (same database and user, the proxy's socket)."""
        parts = urlsplit(self._base_dsn)
        query = dict(parse_qsl(parts.query))
        query["host"] = str(self._directory)
        query["port"] = str(self._port)
        return urlunsplit(parts._replace(query=urlencode(query)))

    def mark(self) -> int:
        """A position in the record, for `since`."""
        return len(self.sent)

    def since(self, mark: int = 0) -> list[Sent]:
        return self.sent[mark:]

    async def wait_for_statement(self, fragment: str, mark: int = 0) -> Sent:
        """Return once a statement containing `fragment` was sent after `mark` (the
        caller bounds the wait)."""

        def found() -> Sent | None:
            return next((m for m in self.since(mark) if m.statement and fragment in m.sql), None)

        async with self._recorded:
            await self._recorded.wait_for(lambda: found() is not None)
        sent = found()
        assert sent is not None
        return sent

    def round_trips(self, mark: int = 0) -> int:
        return sum(1 for m in self.since(mark) if m.round_trip)

    def statements(self, mark: int = 0) -> list[str]:
        """The SQL of each statement executed since `mark`, in order."""
        return [m.sql for m in self.since(mark) if m.statement]

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, dsn: str) -> AsyncIterator[CountingProxy]:
        """A proxy in front of the unix-socket server `dsn` names (as the embedded one does)."""
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or ""
        if not host.startswith("/"):
            raise ValueError("CountingProxy needs a unix-socket DSN (host=/path)")
        port = int(query.get("port") or parts.port or 5432)
        directory = Path(tempfile.mkdtemp(prefix="pgwire-"))
        proxy = cls(Path(host) / f".s.PGSQL.{port}", directory, port, dsn)
        proxy._server = await asyncio.start_unix_server(
            proxy._accept, path=str(directory / f".s.PGSQL.{port}")
        )
        try:
            yield proxy
        finally:
            proxy._server.close()
            for pump in list(proxy._pumps):
                pump.cancel()
            await asyncio.gather(*proxy._pumps, return_exceptions=True)
            await proxy._server.wait_closed()
            shutil.rmtree(directory, ignore_errors=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        try:
            server_r, server_w = await asyncio.open_unix_connection(str(self._target))
        except OSError:
            client_w.close()
            return
        upstream = asyncio.create_task(self._client_to_server(number, client_r, server_w))
        downstream = asyncio.create_task(_copy(server_r, client_w))
        for pump in (upstream, downstream):
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)
        await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        for pump in (upstream, downstream):
            pump.cancel()
        for writer in (client_w, server_w):
            with contextlib.suppress(Exception):
                writer.close()

    async def _client_to_server(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        prepared: dict[str, str] = {}
        bound = ""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            # Startup: untyped messages until the StartupMessage itself.
            while True:
                head = await reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                body = await reader.readexactly(length - 8)
                writer.write(head + body)
                await writer.drain()
                if code == _CANCEL_REQUEST:
                    return
                if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                    break
            while True:
                head = await reader.readexactly(5)
                kind = chr(head[0])
                (length,) = struct.unpack("!i", head[1:])
                body = await reader.readexactly(length - 4)
                sql = ""
                if kind == "Q":
                    sql = body.rstrip(b"\0").decode(errors="replace")
                elif kind == "P":
                    name, rest = body.split(b"\0", 1)
                    prepared[name.decode()] = rest.split(b"\0", 1)[0].decode(errors="replace")
                elif kind == "B":
                    _portal, statement, _ = body.split(b"\0", 2)
                    bound = prepared.get(statement.decode(), "")
                elif kind == "E":
                    sql = bound
                async with self._recorded:
                    self.sent.append(Sent(number, kind, sql, time.monotonic()))
                    self._recorded.notify_all()
                writer.write(head + body)
                await writer.drain()
                if kind == "X":
                    return


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
