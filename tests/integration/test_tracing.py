"""One generation yields one trace under the caller's traceparent, with the
instrumentations' own spans; /metrics counts it by outcome."""

from __future__ import annotations

from pathlib import Path

import httpx
from imagegen.v1 import common_pb2, generation_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from imagegen.telemetry import setup_telemetry
from tests.fakes.forge_server import ForgeFake, Reply, png_bytes
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import generate

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


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
                    prompt="a traced fox",
                    provider="forge",
                    size=common_pb2.ImageSize(width=512, height=512),
                ),
                extra_metadata=[("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01")],
            )
            assert err is None
            assert events[-1].type == generation_pb2.GENERATION_EVENT_TYPE_COMPLETED
            async with httpx.AsyncClient(trust_env=False) as http:
                metrics = (await http.get(f"http://127.0.0.1:{server.http_port}/metrics")).text

    spans = exporter.get_finished_spans()
    ours = [s for s in spans if format(s.context.trace_id, "032x") == CALLER_TRACE_ID]
    names = {s.name for s in ours}
    # The incoming RPC, continued from the caller's traceparent.
    rpc = [s for s in ours if s.name == "imagegen.v1.ImageGenerationService/GenerateImage"]
    assert len(rpc) == 1
    assert rpc[0].parent is not None and format(rpc[0].parent.span_id, "016x") == CALLER_SPAN_ID
    assert rpc[0].attributes["rpc.system.name"] == "grpc"
    assert rpc[0].attributes["rpc.response.status_code"] == "OK"
    # The job, run by a worker, joins the same trace.
    assert {"generation.run", "generation.provider_call", "image.process", "storage.put"} <= names
    # The instrumentations' own spans: httpx to the provider, S3 PutObject, PostgreSQL.
    provider_calls = [
        s
        for s in ours
        if "GenerateImage" in str(s.attributes.get("url.full", s.attributes.get("http.url", "")))
    ]
    assert len(provider_calls) == 1, names
    assert any("PutObject" in s.name for s in ours), names
    database = [s for s in ours if s.attributes.get("db.system.name") == "postgresql"]
    assert {"INSERT generations", "INSERT images", "BEGIN", "COMMIT"} <= {s.name for s in database}
    for span in database:
        # Named by query summary; the pool's reset on release is not traced.
        assert span.name == span.attributes["db.query.summary"]
        assert "RESET ALL" not in str(span.attributes["db.query.text"])
    process = next(s for s in ours if s.name == "image.process")
    assert process.attributes["imagegen.image.input.size"] == len(provider_png)
    assert process.attributes["imagegen.image.format"] == "png"
    assert process.attributes["imagegen.image.mime_type"] == "image/png"
    assert process.attributes["imagegen.image.width"] == 512
    put = next(s for s in ours if s.name == "storage.put")
    assert put.attributes["imagegen.blob.size"] == process.attributes["imagegen.image.size"]
    assert put.attributes["imagegen.blob.mime_type"] == "image/png"
    assert put.attributes["imagegen.blob.bucket"] == s3_bucket
    # The folder, never the rest of the key (it names the user and the image).
    assert put.attributes["imagegen.blob.key_prefix"] == "generated"
    run = next(s for s in ours if s.name == "generation.run")
    assert run.attributes["imagegen.provider"] == "forge"
    assert run.attributes["imagegen.outcome"] == "completed"
    for span in ours:
        for value in span.attributes.values():
            assert "a traced fox" not in str(value), f"{span.name} carries the prompt"

    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("imagegen_generations_total{")
        and 'outcome="completed"' in line
        and 'provider="forge"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == 1.0, metrics
