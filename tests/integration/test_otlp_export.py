"""Spans reach an OTLP collector over the protocol OTEL_EXPORTER_OTLP_PROTOCOL (or the
per-signal OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) names: collectors on loopback that speak
OTLP/gRPC and OTLP/HTTP receive the server span of one RPC under the caller's trace."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest
from imagegen.v1 import generation_pb2, generation_pb2_grpc

from imagegen.telemetry import _span_exporters, setup_telemetry
from tests.fakes.otlp_collector import ReceivedSpans, grpc_collector, http_collector
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, metadata

CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
RPC = "imagegen.v1.ImageGenerationService/ListGenerations"


async def one_traced_rpc(
    tmp_path: Path, database_url: str, env: Mapping[str, str], received: ReceivedSpans
) -> None:
    telemetry = setup_telemetry(env=env)
    assert telemetry.records_spans
    try:
        async with serve_in_process(tmp_path, database_url, telemetry=telemetry) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
                await stub.ListGenerations(
                    generation_pb2.ListGenerationsRequest(),
                    metadata=(
                        *metadata(),
                        ("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"),
                    ),
                )
    finally:
        # Flushes the batch processor: everything recorded is exported by now.
        await telemetry.shutdown()
    [rpc] = received.named(RPC)
    assert rpc.trace_id.hex() == CALLER_TRACE_ID
    assert rpc.parent_span_id.hex() == CALLER_SPAN_ID
    attributes = {a.key: a.value.string_value for a in rpc.attributes}
    assert attributes["rpc.response.status_code"] == "OK"
    assert received.service_names == {"imagegen-otlp-test"}


async def test_grpc_protocol_exports_to_an_otlp_grpc_collector(
    tmp_path: Path, database_url: str
) -> None:
    async with grpc_collector() as (endpoint, received):
        env = {
            "OTEL_SERVICE_NAME": "imagegen-otlp-test",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
        await one_traced_rpc(tmp_path, database_url, env, received)
    assert set(received.requests) == {"grpc"}


async def test_http_protobuf_protocol_posts_to_v1_traces(
    tmp_path: Path, database_url: str
) -> None:
    async with http_collector() as (endpoint, received):
        env = {
            "OTEL_SERVICE_NAME": "imagegen-otlp-test",
            # The general endpoint is a base URL: /v1/traces is added to it.
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        await one_traced_rpc(tmp_path, database_url, env, received)
    assert set(received.requests) == {"/v1/traces application/x-protobuf"}


async def test_the_traces_protocol_and_endpoint_win_over_the_general_ones(
    tmp_path: Path, database_url: str
) -> None:
    async with http_collector() as (endpoint, received):
        env = {
            "OTEL_SERVICE_NAME": "imagegen-otlp-test",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            # The per-signal endpoint is used as it is.
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{endpoint}/v1/traces",
        }
        await one_traced_rpc(tmp_path, database_url, env, received)
    assert set(received.requests) == {"/v1/traces application/x-protobuf"}


def test_an_unknown_protocol_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        _span_exporters(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            }
        )
