"""Micro-benchmark: the CPU that tracing costs one request when no exporter is configured.

One "request" does what a GetGeneration RPC and a short job do to the tracing API: the
server span continues a caller's traceparent, three nested spans with attributes, ten
database queries and one pool reset (as repositories/db.py decides whether to trace
them), one traceparent injected into a job. It runs under:

- `recording`: the SDK's provider with no exporter and every query traced, as before
  (spans recorded for nothing, one per query and one per pool reset);
- `recording-now`: the SDK's provider as a server with an exporter has it now (queries
  traced inside a recorded trace, the pool reset not), the export itself left out;
- `sdk-off`: the SDK's provider with the ALWAYS_OFF sampler (non-recording spans, ids
  still made for each);
- `unrecorded`: what a server without an exporter uses now (telemetry.py's
  UnrecordedTracerProvider: the current span handed back, nothing made);
- `no-tracing`: the same request with no tracing call at all (the floor).

Prints CPU microseconds per request (median of five rounds) and the ratio to the
`recording` setup measured in the same run. Asserts nothing.

    .venv/bin/python bench/span_bench.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from imagegen.repositories.db import summarize_sql
from imagegen.telemetry import UnrecordedTracerProvider

CALLER = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
QUERIES = [
    "SELECT * FROM generations WHERE id = $1 AND user_id = $2",
    "INSERT INTO generation_events (generation_id, sequence, event_type) VALUES ($1, $2, $3)",
    "UPDATE generations SET state = 'running' WHERE id = $1",
] * 4
QUERIES = QUERIES[:10]
RESET = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"


def query_span(tracer: trace.Tracer, sql: str, *, always: bool) -> None:
    """What the database layer does around one query."""
    if always:
        # The asyncpg instrumentation used before: a span per query, whatever the context.
        with tracer.start_as_current_span(sql.split(maxsplit=1)[0], kind=trace.SpanKind.CLIENT):
            pass
        return
    if not trace.get_current_span().is_recording():
        return
    summary = summarize_sql(sql)
    span = tracer.start_span(
        summary.text,
        kind=trace.SpanKind.CLIENT,
        attributes={"db.system.name": "postgresql", "db.query.text": sql},
    )
    span.end()


def request(tracer: trace.Tracer, *, old_database: bool) -> None:
    parent = propagate.extract(CALLER)
    server = tracer.start_span(
        "imagegen.v1.ImageGenerationService/GetGeneration",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system.name": "grpc", "rpc.method": "GetGeneration"},
    )
    token = otel_context.attach(trace.set_span_in_context(server, parent))
    try:
        for name in ("generation.validate", "generation.run", "image.process"):
            with tracer.start_as_current_span(
                name, attributes={"imagegen.provider": "forge", "imagegen.count": 1}
            ):
                pass
        for sql in QUERIES:
            query_span(tracer, sql, always=old_database)
        if old_database:
            query_span(tracer, RESET, always=True)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    finally:
        server.set_attribute("rpc.response.status_code", "OK")
        server.end()
        otel_context.detach(token)


def bare_request() -> None:
    """The same request shape with no tracing call at all."""
    for _ in range(3):
        pass
    for sql in QUERIES:
        summarize_sql(sql)


def cpu_us_per_request(run: Callable[[], None], requests: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(requests):
            run()
        rounds.append((time.process_time() - started) / requests * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()

    recording = TracerProvider().get_tracer("bench")
    sdk_off = TracerProvider(sampler=ALWAYS_OFF).get_tracer("bench")
    unrecorded = UnrecordedTracerProvider().get_tracer("bench")
    setups: list[tuple[str, Callable[[], None]]] = [
        ("recording", lambda: request(recording, old_database=True)),
        ("recording-now", lambda: request(recording, old_database=False)),
        ("sdk-off", lambda: request(sdk_off, old_database=False)),
        ("unrecorded", lambda: request(unrecorded, old_database=False)),
        ("no-tracing", bare_request),
    ]
    for _name, run in setups:  # warm up (caches, imports)
        for _ in range(500):
            run()
    figures = [(name, cpu_us_per_request(run, args.requests)) for name, run in setups]

    load = os.getloadavg()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"{args.requests} requests x 5 rounds"
    )
    print(f"{'setup':<14} {'CPU us/request':>15} {'ratio to recording':>20}")
    base = figures[0][1]
    for name, micros in figures:
        print(f"{name:<14} {micros:>15.1f} {micros / base:>20.2f}")


if __name__ == "__main__":
    main()
