"""The MCP face against a served process: the SDK's own client over Streamable HTTP and
over stdio (`imagegen mcp`), every schema checked as JSON Schema 2020-12, the bounded
wait and resume, idempotent tool calls, a restart between handle and resume, and the
Tasks extension spoken as raw JSON-RPC."""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import httpx2
import pytest
from jsonschema import Draft202012Validator
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, ImageContent
from PIL import Image

from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e

MCP_ENV = {"IMAGEGEN_MCP_PORT": "0", "IMAGEGEN_MCP_WAIT": "20", "IMAGEGEN_MCP_MAX_WAIT": "30"}
#: A job that takes a few seconds: the local renderer pauses this long between its steps.
SLOW_ENV = {**MCP_ENV, "IMAGEGEN_LOCAL_STEP_DELAY": "0.25"}
TASKS = "io.modelcontextprotocol/tasks"
MODERN = "2026-07-28"


def url(server: ServedProcess) -> str:
    return f"http://{server.mcp_address}/mcp"


@asynccontextmanager
async def http_session(
    server: ServedProcess, token: str | None = None, *, modern: bool = False
) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token or server.token()}"}
    async with (
        httpx2.AsyncClient(
            trust_env=False, headers=headers, timeout=httpx2.Timeout(30, read=120)
        ) as client,
        streamable_http_client(url(server), http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        if modern:
            await session.discover()
        else:
            await session.initialize()
        yield session


@asynccontextmanager
async def stdio_session(server: ServedProcess, user: str = "alice") -> AsyncIterator[ClientSession]:
    env = {
        k: v
        for k, v in server.env.items()
        if k in ("PATH", "HOME", "PYTHONPATH", "LANG", "IMAGEGEN_DATA_DIR")
    }
    env.update(
        {
            "IMAGEGEN_ADDR": server.grpc_address,
            "IMAGEGEN_TOKEN": server.token(user),
            "IMAGEGEN_MCP_WAIT": "20",
            "IMAGEGEN_MCP_MAX_WAIT": "30",
        }
    )
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "imagegen.cli", "mcp"], env=env
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def count_jobs(server: ServedProcess, request_id_prefix: str = "") -> int:
    conn = await asyncpg.connect(server.env["DATABASE_URL"])
    try:
        value = await conn.fetchval(
            "SELECT count(*) FROM generations WHERE request_id LIKE $1",
            request_id_prefix + "%",
        )
    finally:
        await conn.close()
    return int(value)


def check_schemas(tools: list[Any]) -> dict[str, Any]:
    schemas = {}
    for tool in tools:
        Draft202012Validator.check_schema(tool.input_schema)
        assert tool.output_schema is not None, tool.name
        Draft202012Validator.check_schema(tool.output_schema)
        schemas[tool.name] = tool.output_schema
    return schemas


def check_result(result: CallToolResult, output_schema: dict[str, Any]) -> dict[str, Any]:
    assert not result.is_error, result.content
    Draft202012Validator(output_schema).validate(result.structured_content)
    return result.structured_content


def thumbnails(result: CallToolResult) -> list[Image.Image]:
    images = [block for block in result.content if isinstance(block, ImageContent)]
    return [Image.open(io.BytesIO(base64.b64decode(block.data))) for block in images]


@pytest.fixture
async def served(tmp_path: Path, database_url: str) -> AsyncIterator[ServedProcess]:
    server = await start_server(tmp_path, database_url, extra_env=MCP_ENV)
    try:
        yield server
    finally:
        server.terminate()
        await server.wait_exit(30)


async def test_http_client_lists_validated_tools_and_generates(served: ServedProcess) -> None:
    async with http_session(served) as session:
        listed = await session.list_tools()
        schemas = check_schemas(listed.tools)
        assert set(schemas) == {
            "generate_image",
            "edit_image",
            "get_generation",
            "cancel_generation",
            "list_images",
            "list_templates",
            "generate_from_template",
            "quote_generation",
            "get_credit_balance",
        }
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        result = await session.call_tool(
            "generate_image",
            {"prompt": "a lighthouse at dusk", "size": "512x512", "count": 2},
            progress_callback=on_progress,
        )
        out = check_result(result, schemas["generate_image"])
        assert out["state"] == "completed" and out["done"] and out["percent"] == 100
        assert len(out["images"]) == 2
        assert all(image["uri"].startswith("http://127.0.0.1:") for image in out["images"])
        thumbs = thumbnails(result)
        assert len(thumbs) == 2
        assert all(max(t.size) <= 256 and t.format == "WEBP" for t in thumbs)
        assert progress and progress == sorted(progress)

        # The URL serves the full image, which the thumbnail is made from.
        async with httpx.AsyncClient(trust_env=False) as client:
            full = await client.get(out["images"][0]["uri"])
        assert full.status_code == 200
        assert Image.open(io.BytesIO(full.content)).size == (512, 512)

        for name, arguments in (
            ("list_images", {"page_size": 5}),
            ("list_templates", {}),
            ("quote_generation", {"prompt": "x", "size": "512x512", "count": 2}),
            ("get_credit_balance", {}),
            ("get_generation", {"name": out["name"]}),
        ):
            check_result(await session.call_tool(name, arguments), schemas[name])
