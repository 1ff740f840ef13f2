"""The pool traces its queries (repositories/db.py) against a real PostgreSQL: spans named
by query summary with the database conventions' attributes, only inside a recorded
trace, never for the pool's reset, never with a parameter's value."""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from imagegen.repositories.db import open_pool

SECRET = "a-value-no-span-may-carry"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def test_queries_in_a_trace_are_spans_named_by_summary(
    database_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    pool = await open_pool(database_url, max_size=2, tracer=tracer)
    try:
        with tracer.start_as_current_span("job") as job:
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchval("SELECT count(*) FROM generations WHERE user_id = $1", SECRET)
                await conn.execute(
                    "INSERT INTO user_settings (user_id, default_provider) VALUES ($1, $2)",
                    SECRET,
                    "local",
                )
            await pool.fetchrow("SELECT * FROM user_settings WHERE user_id = $1", SECRET)
    finally:
        await pool.close()

    spans = [s for s in exporter.get_finished_spans() if s.name != "job"]
    assert [s.name for s in spans] == [
        "BEGIN",
        "SELECT generations",
        "INSERT user_settings",
        "COMMIT",
        "SELECT user_settings",
    ]
    for span in spans:
        assert span.parent is not None and span.parent.span_id == job.get_span_context().span_id
        assert span.kind is SpanKind.CLIENT
        assert span.attributes["db.system.name"] == "postgresql"
        assert span.attributes["db.query.summary"] == span.name
        assert span.attributes["db.namespace"] == urlsplit(database_url).path.lstrip("/")
        for value in span.attributes.values():
            assert SECRET not in str(value), f"{span.name} carries a parameter's value"
    insert = spans[2]
    assert insert.attributes["db.query.text"].startswith("INSERT INTO user_settings")
    assert "$1" in insert.attributes["db.query.text"]
    assert insert.attributes["db.operation.name"] == "INSERT"
    assert insert.attributes["db.collection.name"] == "user_settings"
    assert "db.collection.name" not in spans[0].attributes


async def test_no_span_outside_a_recorded_trace_nor_for_the_pool_reset(
    database_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    pool = await open_pool(database_url, max_size=1, tracer=tracer)
    try:
        # An idle poll: no trace is current, so no one-span trace per poll.
        for _ in range(3):
            await pool.fetchval("SELECT count(*) FROM generations WHERE state = 'queued'")
        assert exporter.get_finished_spans() == ()

        with tracer.start_as_current_span("job"):
            # Acquire and release: the pool's reset runs on release, inside the trace.
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    finally:
        await pool.close()
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["SELECT", "job"], names


async def test_a_failed_query_is_an_error_span_with_its_sqlstate(
    database_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    pool = await open_pool(database_url, max_size=1, tracer=tracer)
    try:
        with tracer.start_as_current_span("job"), pytest.raises(asyncpg.UndefinedTableError):
            await pool.fetch("SELECT * FROM no_such_table")
    finally:
        await pool.close()
    failed = next(s for s in exporter.get_finished_spans() if s.name == "SELECT no_such_table")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "UndefinedTableError"
    assert failed.attributes["db.response.status_code"] == "42P01"


async def test_without_a_tracer_the_pool_is_plain(database_url: str) -> None:
    pool = await open_pool(database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            assert type(conn._con) is asyncpg.Connection
    finally:
        await pool.close()
