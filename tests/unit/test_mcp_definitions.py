"""The tool definitions: one source for MCP and OpenAI function calling, valid JSON
Schema 2020-12, and request ids derived inside the contract's alphabet."""

from __future__ import annotations

import json
import re

import pytest
from jsonschema import Draft202012Validator

from imagegen.cli import main
from imagegen.mcp import TOOLS, mcp_tool_definitions, openai_tool_definitions
from imagegen.mcp.definitions import REQUEST_ID_PATTERN
from imagegen.mcp.server import derive_request_id


def test_openai_definitions_are_valid_and_match_the_mcp_ones() -> None:
    openai = openai_tool_definitions()
    mcp = mcp_tool_definitions()
    assert [t["function"]["name"] for t in openai] == [t["name"] for t in mcp]
    assert len({t["name"] for t in mcp}) == len(TOOLS) == 9
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
