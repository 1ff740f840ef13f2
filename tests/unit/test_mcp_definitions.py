"""The tool definitions: one source for MCP and OpenAI function calling, valid JSON
Schema 2020-12, and request ids derived inside the contract's alphabet."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from jsonschema import Draft202012Validator

from imagegen.cli import main
from imagegen.mcp import TOOLS, mcp_tool_definitions, openai_tool_definitions
from imagegen.mcp.backend import failure_from_rpc
from imagegen.mcp.definitions import REQUEST_ID_PATTERN
from imagegen.mcp.server import derive_request_id
from imagegen.mcp.tools import error_result


def test_openai_definitions_are_valid_and_match_the_mcp_ones() -> None:
    openai = openai_tool_definitions()
    mcp = mcp_tool_definitions()
    assert [t["function"]["name"] for t in openai] == [t["name"] for t in mcp]
    assert len({t["name"] for t in mcp}) == len(TOOLS) == 14
    for function, tool in zip(openai, mcp, strict=True):
        assert function["type"] == "function"
        Draft202012Validator.check_schema(function["function"]["parameters"])
        Draft202012Validator.check_schema(tool["outputSchema"])
        assert function["function"]["description"] == tool["description"]
        assert function["function"]["parameters"] == tool["inputSchema"]
        assert tool["inputSchema"]["type"] == "object" == tool["outputSchema"]["type"]


def test_parameter_schemas_accept_good_and_refuse_bad_arguments() -> None:
    by_name = {
        t["function"]["name"]: t["function"]["parameters"] for t in openai_tool_definitions()
    }
    generate = Draft202012Validator(by_name["generate_image"])
    assert generate.is_valid({"prompt": "a cat", "size": "512x512", "count": 4})
    for bad in (
        {},
        {"prompt": ""},
        {"prompt": "x" * 4001},
        {"prompt": "a cat", "count": 5},
        {"prompt": "a cat", "size": "big"},
        {"prompt": "a cat", "request_id": "has space"},
        {"prompt": "a cat", "request_id": "x" * 129},
        {"prompt": "a cat", "colour": "red"},
    ):
        assert not generate.is_valid(bad), bad
    edit = Draft202012Validator(by_name["edit_image"])
    assert edit.is_valid({"prompt": "make it blue", "sources": ["images/abc"]})
    assert not edit.is_valid({"prompt": "make it blue", "sources": []})
    assert not edit.is_valid({"prompt": "make it blue", "sources": ["a"] * 5})
    assert Draft202012Validator(by_name["get_credit_balance"]).is_valid({})
    outpaint = Draft202012Validator(by_name["outpaint_image"])
    assert outpaint.is_valid({"source": "images/abc", "prompt": "more sea", "left": 2048})
    assert outpaint.is_valid(
        {"source": "images/abc", "prompt": "x", "size": "1536x1024", "anchor": "top_left"}
    )
    for bad in (
        {"prompt": "x", "left": 8},
        {"source": "images/abc", "left": 8},
        {"source": "images/abc", "prompt": "x", "left": 2049},
        {"source": "images/abc", "prompt": "x", "top": -1},
        {"source": "images/abc", "prompt": "x", "anchor": "middle"},
    ):
        assert not outpaint.is_valid(bad), bad
    upscale = Draft202012Validator(by_name["upscale_image"])
    assert upscale.is_valid({"image": "images/abc", "factor": 4, "upscaler": "R-ESRGAN 4x+"})
    for bad in (
        {"image": "images/abc", "factor": 3},
        {"image": "https://x/a.png"},
        {},
        {"image": "images/abc", "format": "gif"},
    ):
        assert not upscale.is_valid(bad), bad
    suggest = Draft202012Validator(by_name["suggest_prompts"])
    assert suggest.is_valid({}) and suggest.is_valid({"text": "a red f", "limit": 50})
    assert not suggest.is_valid({"limit": 51}) and not suggest.is_valid({"text": "x" * 4001})
    enhance = Draft202012Validator(by_name["enhance_prompt"])
    assert enhance.is_valid({"prompt": "a fox", "style": "cinematic"})
    assert not enhance.is_valid({"prompt": ""}) and not enhance.is_valid({"style": "anime"})
    batch = Draft202012Validator(by_name["batch_generate"])
    assert batch.is_valid({"prompts": [{"prompt": "a cat"}, {"prompt": "a dog", "count": 2}]})
    for bad in (
        {"prompts": []},
        {"prompts": [{"prompt": ""}]},
        {"prompts": [{"prompt": "a cat", "sources": ["images/abc"]}]},
        {"prompts": [{"prompt": "a cat"}], "request_id": "has space"},
    ):
        assert not batch.is_valid(bad), bad


@pytest.mark.parametrize("form", ["openai", "mcp"])
def test_cli_prints_the_same_definitions(form: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tools", "--format", form]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = openai_tool_definitions() if form == "openai" else mcp_tool_definitions()
    assert printed == json.loads(json.dumps(expected))


def test_derived_request_ids_fit_the_contract_and_tell_calls_apart() -> None:
    base = derive_request_id("session:abc", 7, "generate_image", {"prompt": "owl"})
    assert re.fullmatch(REQUEST_ID_PATTERN, base) and len(base) <= 128
    assert derive_request_id("session:abc", 7, "generate_image", {"prompt": "owl"}) == base
    others = {
        derive_request_id("session:abd", 7, "generate_image", {"prompt": "owl"}),
        derive_request_id("session:abc", 8, "generate_image", {"prompt": "owl"}),
        derive_request_id("session:abc", "7", "generate_image", {"prompt": "owl"}),
        derive_request_id("session:abc", 7, "edit_image", {"prompt": "owl"}),
        derive_request_id("session:abc", 7, "generate_image", {"prompt": "owls"}),
    }
    assert base not in others and len(others) == 5


def _rpc_error(code: grpc.StatusCode, reason: str, retry_seconds: int | None) -> Any:
    status = status_pb2.Status(code=code.value[0], message="told")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="imagegen.v1"))
    if retry_seconds is not None:
        delay = duration_pb2.Duration(seconds=retry_seconds)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="told")


def test_refusals_become_tool_errors_that_say_whether_to_retry() -> None:
    limited = failure_from_rpc(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "IMG_005", 42))
    assert (limited.code, limited.retryable, limited.retry_after_seconds) == ("IMG_005", True, 42)
    assert "after 42 seconds" in limited.advice()
    invalid = failure_from_rpc(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "IMG_003", None))
    assert (invalid.code, invalid.retryable) == ("IMG_003", False)
    assert "Do not retry" in invalid.advice()
    down = failure_from_rpc(_rpc_error(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", None))
    assert down.retryable and down.retry_after_seconds is None

    result = error_result(down, request_id="mcp-abc")
    assert result.is_error and "request_id='mcp-abc'" in result.content[0].text
    assert result.structured_content["error"]["code"] == "SHUTTING_DOWN"
