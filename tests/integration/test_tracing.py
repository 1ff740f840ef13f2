"""One generation yields one trace under the caller's traceparent: the RPC, the job a
worker runs, the provider call, image processing, storage and the database, named and
attributed by OpenTelemetry's conventions; nothing else (no idle polling, no pool reset)
is traced; /metrics counts it by outcome."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from imagegen.v1 import common_pb2, generation_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from imagegen.repositories.db import summarize_sql
from imagegen.telemetry import setup_telemetry
from tests.fakes.forge_server import ForgeFake, Reply, png_bytes
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import generate

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
PROMPT = "a traced fox"


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, (name, [s.name for s in spans])
    return named[0]


async def test_one_trace_from_rpc_to_provider_storage_and_database(
    tmp_path: Path, database_url: str, s3_endpoint: str, s3_bucket: str
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(span_exporter=exporter, env={})
    provider_png = png_bytes(512, 512)
    async with ForgeFake.start() as fake:
        fake.default = Reply(image=provider_png)
        env = {
            "IMAGEGEN_S3_ENDPOINT": s3_endpoint,
            "IMAGEGEN_S3_BUCKET": s3_bucket,
            "BUILT_IN_FORGE_API_URL": fake.url,
            "BUILT_IN_FORGE_API_KEY": "k",
        }
        async with serve_in_process(tmp_path, database_url, env=env, telemetry=telemetry) as server:
            exporter.clear()
            events, err = await generate(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt=PROMPT,
                    provider="forge",
                    size=common_pb2.ImageSize(width=512, height=512),
                ),
                extra_metadata=[("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01")],
            )
            assert err is None
            assert events[-1].type == generation_pb2.GENERATION_EVENT_TYPE_COMPLETED
            image = next(e.image for e in events if e.HasField("image"))
            # aiohttp, not httpx: the test's own request must not be traced.
            async with (
                aiohttp.ClientSession(trust_env=False) as http,
                http.get(f"http://127.0.0.1:{server.http_port}/metrics") as reply,
            ):
                metrics = await reply.text()
    # Read once the server has stopped: the worker may end its run span after the caller
    # has the terminal event, but a stopped server has ended every job.
    spans = list(exporter.get_finished_spans())

    # Everything traced meanwhile is this one trace: an idle claim loop or a lease
    # heartbeat would have shown up as traces of their own.
    other_traces = {s.name for s in spans if format(s.context.trace_id, "032x") != CALLER_TRACE_ID}
    assert not other_traces

    # The incoming RPC, continued from the caller's traceparent.
    rpc = only(spans, "imagegen.v1.ImageGenerationService/GenerateImage")
    assert rpc.kind is SpanKind.SERVER
    assert parent_of(rpc) == int(CALLER_SPAN_ID, 16)
    assert rpc.attributes["rpc.system.name"] == "grpc"
    assert rpc.attributes["rpc.response.status_code"] == "OK"

    # The job, run by a worker from the queue, joins the RPC that submitted it.
    run = only(spans, "generation.run")
    assert parent_of(run) == rpc.context.span_id
    assert run.attributes["imagegen.provider"] == "forge"
    assert run.attributes["imagegen.outcome"] == "completed"

    call = only(spans, "generation.provider_call")
    assert parent_of(call) == run.context.span_id
    [http_call] = [s for s in spans if parent_of(s) == call.context.span_id and s.name == "POST"]
    assert "GenerateImage" in str(http_call.attributes.get("http.url"))

    process = only(spans, "image.process")
    assert parent_of(process) == run.context.span_id
    assert process.attributes["imagegen.image.input.size"] == len(provider_png)
    # The stored bytes are the prepared ones plus the provenance marks.
    assert 0 < process.attributes["imagegen.image.size"] < image.size_bytes
    assert process.attributes["imagegen.image.format"] == "png"
    assert process.attributes["imagegen.image.mime_type"] == "image/png"
    assert process.attributes["imagegen.image.width"] == 512
    assert process.attributes["imagegen.image.height"] == 512

    mark = only(spans, "image.mark")
    assert parent_of(mark) == run.context.span_id
    assert mark.attributes["imagegen.image.format"] == "png"

    put = only(spans, "storage.put")
    assert parent_of(put) == run.context.span_id
    assert put.attributes["imagegen.blob.size"] == image.size_bytes
    assert put.attributes["imagegen.blob.mime_type"] == "image/png"
    assert put.attributes["imagegen.blob.bucket"] == s3_bucket
    # The folder, never the rest of the key (it names the user and the image).
    assert put.attributes["imagegen.blob.key_prefix"] == "generated"
    s3_put = only(spans, "S3.PutObject")
    assert parent_of(s3_put) == put.context.span_id

    # PostgreSQL: named by query summary, under the RPC (submit, watch) and the job.
    database = [s for s in spans if s.attributes.get("db.system.name") == "postgresql"]
    names = {s.name for s in database}
    assert {"INSERT generations", "INSERT images", "BEGIN", "COMMIT"} <= names, names
    parents = {parent_of(s) for s in database}
    assert {rpc.context.span_id, run.context.span_id} <= parents
    for span in database:
        assert span.kind is SpanKind.CLIENT
        text = str(span.attributes["db.query.text"])
        assert span.name == span.attributes["db.query.summary"] == summarize_sql(text).text
        # The pool's reset on release is not traced.
        assert "RESET ALL" not in text and "pg_advisory_unlock_all" not in text, text

    for span in spans:
        for value in span.attributes.values():
            assert PROMPT not in str(value), f"{span.name} carries the prompt"
            assert "alice" not in str(value) or span.name == "generation.run", (
                f"{span.name} carries the user id"
            )

    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("imagegen_generations_total{")
        and 'outcome="completed"' in line
        and 'provider="forge"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == 1.0, metrics
