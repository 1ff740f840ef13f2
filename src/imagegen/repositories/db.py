"""Connection pools and the one place that knows how asyncpg is set up, including how
its queries are traced.

Database spans follow OpenTelemetry's database conventions: one CLIENT span per
round trip, named after its query summary (`SELECT generations`, `INSERT images`,
`BEGIN`), with `db.system.name`, `db.query.text` (the parameterised SQL as written,
never the values), `db.query.summary`, and `db.operation.name` / `db.collection.name`
when the query names only one operation / one table. A query makes a span only as
part of a trace that records (a job, an RPC): background work (the claim loop, lease
heartbeats, queue statistics) makes none. The pool does not reset connections on
release (`_keep_session`).

OpenTelemetry's asyncpg instrumentation was used before; it has no hook for span
names or attributes (it names spans after the first word: `SELECT`, `WITH`,
`BEGIN;`), writes the older `db.statement`/`db.system`, traces the pool's reset and
starts a one-span trace for every idle poll, hence this small wrapper.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg
from opentelemetry import trace

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
    (`pg_advisory_xact_lock`, released at COMMIT or ROLLBACK) but for the reaper's
    session lock, which its holder releases itself or closes the connection
    (`RetentionRepository.exclusive`), no cursor outlives its
    transaction, nothing LISTENs on a pooled connection (the listener has its own
    connection) and no statement changes a session setting (`SET` without `LOCAL`).
    asyncpg still rolls back a transaction left open before it calls this."""


async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    tracer: trace.Tracer | None = None,
    backend_pids: BackendPids | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose connections speak jsonb as Python objects and are not reset on
    release; the caller closes it. With a tracer, its queries are spans of the traces
    they run in (module docstring); with `backend_pids`, their pids are tracked there."""
    if tracer is not None:
        kwargs.setdefault("connection_class", _traced_connection_class(tracer))

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


# --- spans ----------------------------------------------------------------------------------


def _traced_connection_class(tracer: trace.Tracer) -> type[asyncpg.Connection]:
    class _Traced(TracedConnection):
        _tracer = tracer

    return _Traced


class TracedConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """An asyncpg connection whose queries are spans (see the module docstring).

    Transactions go through `execute` (`BEGIN`, `COMMIT`, `ROLLBACK`), so they are
    spans too: each is a round trip. Prepared statements and cursors, which the
    repositories do not use, are not traced."""

    _tracer: trace.Tracer = trace.NoOpTracer()

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        span = self._start_span(query)
        if span is None:
            return await super().execute(query, *args, **kwargs)
        with _ending(span):
            return await super().execute(query, *args, **kwargs)

    async def executemany(self, command: str, args: Any, **kwargs: Any) -> Any:
        span = self._start_span(command, batch=True)
        if span is None:
            return await super().executemany(command, args, **kwargs)
        with _ending(span):
            return await super().executemany(command, args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        span = self._start_span(query)
        if span is None:
            return await super().fetch(query, *args, **kwargs)
        with _ending(span):
            return await super().fetch(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        span = self._start_span(query)
        if span is None:
            return await super().fetchval(query, *args, **kwargs)
        with _ending(span):
            return await super().fetchval(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        span = self._start_span(query)
        if span is None:
            return await super().fetchrow(query, *args, **kwargs)
        with _ending(span):
            return await super().fetchrow(query, *args, **kwargs)

    async def fetchmany(self, query: str, args: Any, **kwargs: Any) -> Any:
        span = self._start_span(query, batch=True)
        if span is None:
            return await super().fetchmany(query, args, **kwargs)
        with _ending(span):
            return await super().fetchmany(query, args, **kwargs)

    def _start_span(self, query: str, *, batch: bool = False) -> trace.Span | None:
        # Only inside a trace that records: an unrecorded parent makes an unrecorded
        # child anyway, and a query outside any trace would start a trace of its own.
        if not trace.get_current_span().is_recording():
            return None
        summary = summarize_sql(query)
        attributes: dict[str, str] = {
            "db.system.name": "postgresql",
            "db.query.text": query,
            "db.query.summary": summary.text,
        }
        database = getattr(getattr(self, "_params", None), "database", None)
        if database:
            attributes["db.namespace"] = database
        if summary.operation:
            attributes["db.operation.name"] = summary.operation
        if summary.collection:
            attributes["db.collection.name"] = summary.collection
        name = summary.text
        if batch:
            name = f"BATCH {name}"
            attributes["db.query.summary"] = name
            if summary.operation:
                attributes["db.operation.name"] = f"BATCH {summary.operation}"
        return self._tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes)


@contextlib.contextmanager
def _ending(span: trace.Span) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        span.set_attribute("error.type", _error_type(exc))
        if isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None):
            span.set_attribute("db.response.status_code", exc.sqlstate)
        span.set_status(trace.StatusCode.ERROR)
        raise
    finally:
        span.end()


def _error_type(exc: BaseException) -> str:
    return type(exc).__qualname__


# --- query summaries ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuerySummary:
    """What a span says about one SQL statement."""

    #: `db.query.summary` and the span name: each operation with the tables it names,
    #: in order (`SELECT generations`, `INSERT images SELECT generations`).
    text: str
    #: `db.operation.name`, when every operation in the statement is the same one.
    operation: str | None
    #: `db.collection.name`, when the statement names exactly one table.
    collection: str | None


#: Statements that change data or read it; the tables they name follow FROM, JOIN,
#: INTO, UPDATE or USING.
_DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"})
#: Keywords after which a table name follows (UPDATE's is handled with the operations).
_TARGET_BEFORE = frozenset({"FROM", "JOIN", "INTO", "USING", "TABLE"})
_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*.*?\*/)
    | (?P<string>[Ee]?'(?:[^']|'')*')
    | (?P<dollar>\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$)
    | (?P<param>\$\d+)
    | (?P<quoted>"(?:[^"]|"")+"(?:\."(?:[^"]|"")+"|\.[A-Za-z_][A-Za-z0-9_$]*)*)
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*(?:\.(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+"))*)
    | (?P<open>\()
    | (?P<close>\))
    | (?P<comma>,)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(sql: str) -> list[tuple[str, str]]:
    """(kind, text) of each meaningful token; comments, strings and spaces dropped."""
    tokens: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(sql):
        kind = match.lastgroup or "other"
        if kind == "tag":
            kind = "dollar"
        if kind in ("space", "line_comment", "block_comment", "string", "dollar"):
            continue
        tokens.append((kind, match.group()))
    return tokens


@functools.lru_cache(maxsize=2048)
def summarize_sql(sql: str) -> QuerySummary:
    """The low-cardinality summary of `sql` as OpenTelemetry's database conventions
    describe it. Repositories use a fixed set of statements, so results are cached."""
    tokens = _tokens(sql)
    words = [text.upper() if kind == "word" else text for kind, text in tokens]
    if not words:
        return QuerySummary("postgresql", None, None)
    first = words[0]
    if first not in _DML and first != "WITH":
        # BEGIN, COMMIT, ROLLBACK, SET, SHOW, LISTEN, NOTIFY...: the command is the summary.
        return QuerySummary(first, first, None)

    cte_names = _cte_names(tokens)
    parts: list[str] = []
    operations: list[str] = []
    tables: list[str] = []
    # One entry per open parenthesis: whether it holds a subquery. FROM inside any other
    # parenthesis is part of an expression (extract(epoch FROM ...)), not a table.
    subqueries: list[bool] = []
    expect_table = False
    # The depth of the FROM list being read (`FROM a, b`), or None outside one.
    from_list_depth: int | None = None
    previous = ""
    for index, (kind, text) in enumerate(tokens):
        word = words[index]
        next_kind = tokens[index + 1][0] if index + 1 < len(tokens) else ""
        next_word = words[index + 1] if index + 1 < len(tokens) else ""
        in_expression = bool(subqueries) and not subqueries[-1]
        if kind == "open":
            subqueries.append(next_word in _DML or next_word in ("WITH", "VALUES"))
            expect_table = False
        elif kind == "close":
            if subqueries:
                subqueries.pop()
            expect_table = False
            if from_list_depth is not None and len(subqueries) < from_list_depth:
                from_list_depth = None
        elif kind == "comma":
            if from_list_depth == len(subqueries):
                expect_table = True
        elif kind in ("word", "quoted") and not in_expression:
            if word in _DML:
                if _is_operation(word, previous):
                    operations.append(word)
                    parts.append(word)
                expect_table = word == "UPDATE" and _is_operation(word, previous)
                from_list_depth = None
            elif word in _TARGET_BEFORE:
                expect_table = True
                from_list_depth = len(subqueries) if word == "FROM" else None
            elif word in _CLAUSE_WORDS:
                expect_table = False
                from_list_depth = None
            elif expect_table and word not in _TABLE_PREFIXES:
                expect_table = False
                # `name(` is a function (FROM unnest($1)), except the column list
                # of INSERT INTO name (a, b).
                is_function = next_kind == "open" and previous != "INTO"
                if not is_function and text not in cte_names:
                    # A table, as written (quotes and schema included).
                    parts.append(text)
                    tables.append(text)
        previous = word
    text = " ".join(_collapse(parts)) if parts else first
    operation = operations[0] if operations and len(set(operations)) == 1 else None
    collection = tables[0] if len(set(tables)) == 1 else None
    return QuerySummary(text, operation, collection)


#: Words that come between FROM/JOIN and the table they name.
_TABLE_PREFIXES = frozenset({"ONLY", "LATERAL"})


def _is_operation(word: str, previous: str) -> bool:
    # `FOR UPDATE` / `FOR NO KEY UPDATE` lock rows and `ON CONFLICT ... DO UPDATE` is
    # part of its INSERT: not operations of their own.
    return not (word == "UPDATE" and previous in ("FOR", "DO", "KEY"))


#: Words that end a table reference or a FROM list.
_CLAUSE_WORDS = frozenset(
    {
        "WHERE",
        "ON",
        "GROUP",
        "ORDER",
        "LIMIT",
        "OFFSET",
        "FOR",
        "SET",
        "VALUES",
        "RETURNING",
        "HAVING",
        "WINDOW",
        "UNION",
        "EXCEPT",
        "INTERSECT",
        "DEFAULT",
    }
)


def _cte_names(tokens: list[tuple[str, str]]) -> frozenset[str]:
    """Names a WITH clause defines (`WITH claimed AS (...)`): not tables."""
    names: set[str] = set()
    for index in range(len(tokens) - 2):
        kind, text = tokens[index]
        if kind not in ("word", "quoted"):
            continue
        if tokens[index + 1][1].upper() != "AS":
            continue
        kind_after, text_after = tokens[index + 2]
        # `name AS (`, `name AS MATERIALIZED (`, `name AS NOT MATERIALIZED (`
        if kind_after == "open" or text_after.upper() in ("MATERIALIZED", "NOT"):
            names.add(text)
    return frozenset(names)


def _collapse(parts: list[str]) -> list[str]:
    """Drop a part repeated right after itself: a self-join (`SELECT images images`), or
    a SELECT that reads only the WITH clause's results (`INSERT events SELECT SELECT`)."""
    collapsed: list[str] = []
    for part in parts:
        if not collapsed or collapsed[-1] != part:
            collapsed.append(part)
    return collapsed
