"""End to end against a served process: after one generation, /metrics parses with
prometheus_client's own parser, every family has HELP and TYPE, RPC and process metrics
are there, and every series and label the alert rules (deploy/alerts.yaml) use exists;
the log lines of the RPC and of its job carry the caller's trace id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from imagegen.v1 import common_pb2, generation_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.served import start_server

pytestmark = pytest.mark.e2e
E = generation_pb2
ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "alerts.yaml"
CALLER_TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "10f067aa0ba902b7"


def selectors(node: Any) -> Iterator[Any]:
    """Every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    for attribute in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from selectors(child)
    for child in getattr(node, "args", None) or ():
        yield from selectors(child)


async def test_metrics_after_one_generation_serve_every_series_the_alerts_use(
    tmp_path: Path, database_url: str
) -> None:
    server = await start_server(tmp_path, database_url)
    try:
        async with server.channel() as channel:
            events = [
                response.event
                async for response in server.stub(channel).GenerateImage(
                    E.GenerateImageRequest(
                        spec=common_pb2.GenerationSpec(
                            prompt="a measured heron",
                            size=common_pb2.ImageSize(width=256, height=256),
                        )
                    ),
                    metadata=(
                        *server.metadata(),
                        ("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"),
                    ),
                    timeout=60,
                )
            ]
        assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        async with httpx.AsyncClient(trust_env=False) as http:
            reply = await http.get(f"http://{server.http_address}/metrics", timeout=10)
        assert reply.status_code == 200
        families = list(text_string_to_metric_families(reply.text))
    finally:
        server.terminate()
        await server.wait_exit(60)

    for family in families:
        assert family.documentation.strip(), f"{family.name} has no HELP text"
        assert family.type != "unknown", f"{family.name} has no TYPE"
    samples = [sample for family in families for sample in family.samples]
    labels_by_name: dict[str, set[str]] = {}
    for sample in samples:
        labels_by_name.setdefault(sample.name, set()).update(sample.labels)

    # gRPC calls by method and code, and the process itself.
    generate_calls = [
        s
        for s in samples
        if s.name == "rpc_server_call_duration_seconds_count"
        and s.labels.get("rpc_method") == "imagegen.v1.ImageGenerationService/GenerateImage"
    ]
    assert [(s.labels["rpc_response_status_code"], s.value) for s in generate_calls] == [
        ("OK", 1.0)
    ]
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert name in labels_by_name, name

    # Every series an alert rule selects exists, with every label it matches on.
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert rules
    for rule in rules:
        for selector in selectors(promql_parser.parse(rule["expr"])):
            name = selector.name
            assert name in labels_by_name, f"{rule['alert']} uses {name}, not on /metrics"
            for matcher in selector.matchers.matchers:
                assert matcher.name in labels_by_name[name], (
                    f"{rule['alert']} matches {name} on {matcher.name}, a label it lacks"
                )

    # The RPC's log lines and its job's (run by a worker) join the caller's trace.
    entries = server.log_entries()
    for message in ("generation accepted", "generation finished"):
        [entry] = [e for e in entries if e.get("message") == message]
        assert entry.get("trace_id") == CALLER_TRACE_ID, entry
        assert len(entry.get("span_id", "")) == 16, entry
    assert server.log_problems() == []
