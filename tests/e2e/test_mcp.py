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
from prometheus_client.parser import text_string_to_metric_families

from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e

MCP_ENV = {"IMAGEGEN_MCP_PORT": "0", "IMAGEGEN_MCP_WAIT": "20", "IMAGEGEN_MCP_MAX_WAIT": "30"}
#: A job that takes a few seconds: the local renderer pauses this long between its steps.
SLOW_ENV = {**MCP_ENV, "IMAGEGEN_LOCAL_STEP_DELAY": "1.0"}
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
    env = {k: v for k, v in server.env.items() if not k.startswith("IMAGEGEN_")}
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


async def rpc_counts(server: ServedProcess) -> dict[str, float]:
    """gRPC calls the server has answered so far, by method (from /metrics)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(f"http://{server.http_address}/metrics", timeout=10)
    reply.raise_for_status()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == "rpc_server_call_duration_seconds_count":
                method = sample.labels["rpc_method"]
                counts[method] = counts.get(method, 0) + sample.value
    return counts


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


async def restart(
    server: ServedProcess, tmp_path: Path, name: str, env: dict[str, str] = SLOW_ENV
) -> ServedProcess:
    """Stop a served process and start it again on the same data directory and database
    (its local blob store lives in the data directory)."""
    server.terminate()
    await server.wait_exit(60)
    (tmp_path / f"{name}.ready").unlink()
    return await start_server(tmp_path, server.env["DATABASE_URL"], extra_env=env, name=name)


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
            "outpaint_image",
            "upscale_image",
            "suggest_prompts",
            "enhance_prompt",
            "batch_generate",
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

        prompts = [
            {"prompt": "a paper kite", "size": "256x256"},
            {"prompt": "a sailing boat", "size": "256x256", "count": 2},
        ]
        batch = check_result(
            await session.call_tool("batch_generate", {"prompts": prompts}),
            schemas["batch_generate"],
        )
        assert batch["batch"].startswith("batches/")
        assert [g["state"] for g in batch["generations"]] == ["queued", "queued"]
        last = check_result(
            await session.call_tool(
                "get_generation", {"name": batch["generations"][1]["name"], "wait_seconds": 30}
            ),
            schemas["get_generation"],
        )
        assert last["state"] == "completed" and len(last["images"]) == 2


async def test_outpaint_upscale_and_prompt_tools_over_the_sdk_client(
    served: ServedProcess,
) -> None:
    async with http_session(served) as session:
        schemas = check_schemas((await session.list_tools()).tools)
        made = check_result(
            await session.call_tool(
                "generate_image", {"prompt": "a lighthouse at dusk", "size": "256x256"}
            ),
            schemas["generate_image"],
        )
        (image,) = made["images"]

        outpainted = await session.call_tool(
            "outpaint_image",
            {"source": image["name"], "prompt": "more sea", "right": 64, "bottom": 32},
        )
        out = check_result(outpainted, schemas["outpaint_image"])
        assert out["state"] == "completed" and out["credits"] == 2
        assert [(i["width"], i["height"]) for i in out["images"]] == [(320, 288)]
        assert len(thumbnails(outpainted)) == 1
        targeted = check_result(
            await session.call_tool(
                "outpaint_image",
                {"source": image["name"], "prompt": "x", "size": "512x256", "anchor": "left"},
            ),
            schemas["outpaint_image"],
        )
        assert [(i["width"], i["height"]) for i in targeted["images"]] == [(512, 256)]

        arguments = {"image": image["name"], "factor": 4, "request_id": "agent:up-1"}
        upscaled = check_result(
            await session.call_tool("upscale_image", arguments), schemas["upscale_image"]
        )
        assert upscaled["state"] == "completed" and upscaled["credits"] == 2
        assert [(i["width"], i["height"]) for i in upscaled["images"]] == [(1024, 1024)]
        again = check_result(
            await session.call_tool("upscale_image", arguments), schemas["upscale_image"]
        )
        assert again["name"] == upscaled["name"]
        assert await count_jobs(served, "agent:up-1") == 1
        refused = await session.call_tool(
            "upscale_image", {"image": image["name"], "upscaler": "R-ESRGAN 4x+"}
        )
        assert refused.is_error and refused.structured_content["error"]["code"] == "IMG_003"
        schema_refused = await session.call_tool(
            "upscale_image", {"image": image["name"], "factor": 3}
        )
        assert schema_refused.is_error and "factor" in schema_refused.content[0].text

        suggested = check_result(
            await session.call_tool("suggest_prompts", {"text": "a lighth", "limit": 3}),
            schemas["suggest_prompts"],
        )
        assert suggested["suggestions"][0]["text"] == "a lighthouse at dusk"
        assert suggested["suggestions"][0]["source"] == "history"
        enhanced = check_result(
            await session.call_tool(
                "enhance_prompt", {"prompt": "a quiet harbour", "style": "watercolor"}
            ),
            schemas["enhance_prompt"],
        )
        assert enhanced["prompt"].startswith("a quiet harbour, ")
        assert (enhanced["enhancer"], enhanced["credits"]) == ("local", 0)

    # A client that declares the Tasks extension gets an upscale as a task, the job.
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        client = ModernClient(http, served)
        created = await client.call_tool("upscale_image", {"image": image["name"]})
        assert created["resultType"] == "task" and created["taskId"].startswith("generations/")
        await client.call_tool("get_generation", {"name": created["taskId"], "wait_seconds": 30})
        done = (await client.task("tasks/get", created["taskId"]))["result"]
        assert done["status"] == "completed"
        images = done["result"]["structuredContent"]["images"]
        assert [(i["width"], i["height"]) for i in images] == [(512, 512)]

        # Polling the finished task again reads the job once and downloads nothing: its
        # thumbnail was made for the get_generation call above and is kept.
        before = await rpc_counts(served)
        again = (await client.task("tasks/get", created["taskId"]))["result"]
        after = await rpc_counts(served)
        assert again["result"]["structuredContent"]["images"][0]["name"] == images[0]["name"]
        assert [c["type"] for c in again["result"]["content"]].count("image") == 1
        calls = {method: after.get(method, 0) - before.get(method, 0) for method in after}
        assert calls.get("imagegen.v1.ImageGenerationService/GetGeneration") == 1
        assert calls.get("imagegen.v1.ImageLibraryService/DownloadImage", 0) == 0


async def test_http_refuses_missing_and_wrong_tokens(served: ServedProcess) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    wrong = served.token().rsplit(".", 1)[0] + ".forged-signature"
    async with httpx.AsyncClient(trust_env=False) as client:
        for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": "Basic x"}):
            reply = await client.post(
                url(served),
                json=body,
                headers={**headers, "Accept": "application/json, text/event-stream"},
            )
            assert reply.status_code == 401, headers
            assert reply.headers["www-authenticate"].startswith("Bearer")
    assert await count_jobs(served) == 0


@pytest.fixture
async def slow(tmp_path: Path, database_url: str) -> AsyncIterator[ServedProcess]:
    server = await start_server(tmp_path, database_url, extra_env=SLOW_ENV)
    try:
        yield server
    finally:
        server.terminate()
        await server.wait_exit(30)


@asynccontextmanager
async def session_over(transport: str, server: ServedProcess) -> AsyncIterator[ClientSession]:
    opened = stdio_session(server) if transport == "stdio" else http_session(server)
    async with opened as session:
        yield session


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_waits_resumes_and_cancels_over_each_transport(
    slow: ServedProcess, transport: str
) -> None:
    async with session_over(transport, slow) as session:
        schemas = check_schemas((await session.list_tools()).tools)
        # Done within the default wait: the URLs, which serve the image, and thumbnails.
        made = await session.call_tool(
            "generate_image", {"prompt": "a quick sunrise", "size": "256x256"}
        )
        out = check_result(made, schemas["generate_image"])
        assert out["state"] == "completed" and out["done"] and len(out["images"]) == 1
        async with httpx.AsyncClient(trust_env=False) as client:
            full = await client.get(out["images"][0]["uri"])
        assert full.status_code == 200
        assert Image.open(io.BytesIO(full.content)).size == (256, 256)
        assert len(thumbnails(made)) == 1

        # A wait shorter than the job: the answer is a handle to resume with.
        handle = check_result(
            await session.call_tool(
                "generate_image",
                {"prompt": "a slow sunrise", "size": "256x256", "wait_seconds": 0.2},
            ),
            schemas["generate_image"],
        )
        assert handle["state"] in ("queued", "running") and not handle["done"]
        assert handle["name"] in handle["next_step"] and "get_generation" in handle["next_step"]
        resumed = await session.call_tool(
            "get_generation", {"name": handle["name"], "wait_seconds": 30}
        )
        out = check_result(resumed, schemas["get_generation"])
        assert out["state"] == "completed" and len(out["images"]) == 1
        assert len(thumbnails(resumed)) == 1

        # Cancel one that is still running; nothing is charged for it.
        other = check_result(
            await session.call_tool(
                "generate_image",
                {"prompt": "a very slow moon", "size": "256x256", "count": 4, "wait_seconds": 0},
            ),
            schemas["generate_image"],
        )
        cancelled = check_result(
            await session.call_tool("cancel_generation", {"name": other["name"]}),
            schemas["cancel_generation"],
        )
        assert cancelled["name"] == other["name"]
        ended = check_result(
            await session.call_tool("get_generation", {"name": other["name"], "wait_seconds": 30}),
            schemas["get_generation"],
        )
        assert ended["state"] == "cancelled" and ended["credits"] == 0

        # Bad arguments and refusals are tool errors that say whether to retry.
        bad = await session.call_tool("generate_image", {"prompt": "", "count": 9})
        assert bad.is_error and "IMG_003" in bad.content[0].text
        assert "Do not retry" in bad.content[0].text
        missing = await session.call_tool(
            "get_generation", {"name": "generations/00000000-0000-0000-0000-000000000000"}
        )
        assert missing.is_error and missing.structured_content["error"]["code"] == "NOT_FOUND"
        assert missing.structured_content["error"]["retryable"] is False


async def test_restart_between_handle_and_resume(tmp_path: Path, database_url: str) -> None:
    first = await start_server(tmp_path, database_url, extra_env=SLOW_ENV, name="first")
    try:
        async with http_session(first) as session:
            handle = (
                await session.call_tool(
                    "generate_image",
                    {"prompt": "a durable comet", "size": "256x256", "count": 2, "wait_seconds": 0},
                )
            ).structured_content
        assert not handle["done"]
        second = await restart(first, tmp_path, "first")
    finally:
        first.terminate()
        await first.wait_exit(60)
    try:
        async with http_session(second) as session:
            schemas = check_schemas((await session.list_tools()).tools)
            resumed = await session.call_tool(
                "get_generation", {"name": handle["name"], "wait_seconds": 30}
            )
            out = check_result(resumed, schemas["get_generation"])
            assert out["state"] == "completed" and len(out["images"]) == 2
            assert len(thumbnails(resumed)) == 2
    finally:
        second.terminate()
        await second.wait_exit(30)


async def test_request_ids_make_retries_idempotent(served: ServedProcess) -> None:
    arguments = {"prompt": "one fox", "size": "256x256", "request_id": "agent:fox-1"}
    async with http_session(served) as session:
        first = (await session.call_tool("generate_image", arguments)).structured_content
        again = (await session.call_tool("generate_image", arguments)).structured_content
        assert first["name"] == again["name"] and first["request_id"] == "agent:fox-1"
        assert await count_jobs(served, "agent:fox-1") == 1
        # Two calls without a request_id are two jobs, even with the same arguments.
        plain = {"prompt": "two foxes", "size": "256x256"}
        one = (await session.call_tool("generate_image", plain)).structured_content
        two = (await session.call_tool("generate_image", plain)).structured_content
        assert one["name"] != two["name"]
        assert one["request_id"].startswith("mcp-") and two["request_id"].startswith("mcp-")
    assert await count_jobs(served, "mcp-") == 2


async def test_a_resent_request_without_request_id_makes_one_job(served: ServedProcess) -> None:
    headers = {
        "Authorization": f"Bearer {served.token()}",
        "Accept": "application/json, text/event-stream",
    }
    async with httpx.AsyncClient(trust_env=False, headers=headers, timeout=60) as client:
        init = await client.post(
            url(served),
            json={
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            },
        )
        session_id = init.headers["mcp-session-id"]
        session = {"Mcp-Session-Id": session_id, "Mcp-Protocol-Version": "2025-11-25"}
        call = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "generate_image", "arguments": {"prompt": "a resent owl"}},
        }
        # The same JSON-RPC request sent twice (a transport retry) is one job ...
        names = [
            jsonrpc_result(await client.post(url(served), json=call, headers=session))[
                "structuredContent"
            ]["name"]
            for _ in range(2)
        ]
        assert names[0] == names[1]
        # ... while the next request (another JSON-RPC id) or another session is another.
        other_id = jsonrpc_result(
            await client.post(url(served), json={**call, "id": 8}, headers=session)
        )["structuredContent"]["name"]
        other_session = jsonrpc_result(
            await client.post(
                url(served), json=call, headers={**session, "Mcp-Session-Id": session_id + "x"}
            )
        )["structuredContent"]["name"]
        assert len({names[0], other_id, other_session}) == 3


def sse_frames(reply: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data:"))
        for line in reply.text.splitlines()
        if line.startswith("data:") and line.removeprefix("data:").strip()
    ]


def jsonrpc_message(reply: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC response in a JSON or an SSE answer (errors may come with a 4xx)."""
    if reply.headers["content-type"].startswith("application/json"):
        message = reply.json()
        assert reply.status_code == 200 or "error" in message, reply.text
        return message
    assert reply.status_code == 200, reply.text
    for line in reply.text.splitlines():
        if line.startswith("data:"):
            message = json.loads(line.removeprefix("data:"))
            if "id" in message and ("result" in message or "error" in message):
                return message
    raise AssertionError(f"no JSON-RPC response in {reply.text!r}")


def jsonrpc_result(reply: httpx.Response) -> dict[str, Any]:
    message = jsonrpc_message(reply)
    assert "result" in message, message
    return message["result"]


class ModernClient:
    """Raw 2026-07-28 JSON-RPC over Streamable HTTP, declaring the Tasks extension."""

    def __init__(self, client: httpx.AsyncClient, server: ServedProcess, *, tasks: bool = True):
        self._client = client
        self._server = server
        self._tasks = tasks
        self._next_id = 100
        #: Every SSE frame of the last answer (notifications, then the response).
        self.frames: list[dict[str, Any]] = []

    async def request(self, method: str, params: dict[str, Any], name: str | None = None):
        self._next_id += 1
        capabilities = {"extensions": {TASKS: {}}} if self._tasks else {}
        body = {
            "jsonrpc": "2.0",
            "id": self._next_id,
            "method": method,
            "params": {
                **params,
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": MODERN,
                    "io.modelcontextprotocol/clientCapabilities": capabilities,
                    "io.modelcontextprotocol/clientInfo": {"name": "raw-tasks", "version": "1"},
                },
            },
        }
        headers = {
            "Authorization": f"Bearer {self._server.token()}",
            "Accept": "application/json, text/event-stream",
            "Mcp-Protocol-Version": MODERN,
            "Mcp-Method": method,
        }
        if name is not None:
            headers["Mcp-Name"] = name
        reply = await self._client.post(url(self._server), json=body, headers=headers)
        self.frames = [] if reply.status_code != 200 else sse_frames(reply)
        return jsonrpc_message(reply)

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        message = await self.request("tools/call", {"name": tool, "arguments": arguments}, tool)
        return message["result"]

    async def task(self, method: str, task_id: str) -> dict[str, Any]:
        return await self.request(method, {"taskId": task_id}, task_id)


async def test_tasks_extension_over_raw_json_rpc(
    tmp_path: Path, database_url: str, s3_endpoint: str, s3_bucket: str
) -> None:
    # Two replicas share the database and (as in production) the blob store. A replica
    # that stops hands its running jobs back at once instead of finishing them, so the
    # restart below leaves the job running (on either replica) for the cancel to reach.
    env = {
        **SLOW_ENV,
        "IMAGEGEN_SHUTDOWN_GRACE": "1",
        "IMAGEGEN_S3_ENDPOINT": s3_endpoint,
        "IMAGEGEN_S3_BUCKET": s3_bucket,
        "IMAGEGEN_S3_REGION": "us-east-1",
    }
    one = await start_server(tmp_path, database_url, extra_env=env, name="one")
    two = await start_server(tmp_path, database_url, extra_env=env, name="two")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
            on_one, on_two = ModernClient(http, one), ModernClient(http, two)
            discovered = (await on_one.request("server/discover", {}))["result"]
            assert TASKS in discovered["capabilities"]["extensions"]

            created = await on_one.call_tool(
                "generate_image", {"prompt": "a task-shaped kite", "size": "256x256", "count": 4}
            )
            assert created["resultType"] == "task"
            task_id = created["taskId"]
            assert task_id.startswith("generations/") and created["status"] == "working"
            assert created["ttlMs"] is None and created["pollIntervalMs"] > 0

            # The task is the job: any replica answers for it.
            polled = (await on_two.task("tasks/get", task_id))["result"]
            assert polled["taskId"] == task_id and polled["status"] == "working"
            assert polled["resultType"] == "complete"

            # A client that did not declare the extension is refused.
            plain = ModernClient(http, two, tasks=False)
            refused = await plain.task("tasks/get", task_id)
            assert refused["error"]["code"] == -32021
            # ... and gets an ordinary result from a job tool.
            ordinary = await plain.call_tool("get_generation", {"name": task_id, "wait_seconds": 0})
            assert ordinary["structuredContent"]["name"] == task_id

            unknown = await on_two.task(
                "tasks/get", "generations/00000000-0000-0000-0000-000000000000"
            )
            assert unknown["error"]["code"] == -32602

            # After a restart of the replica that made it, the task is still there.
            one = await restart(one, tmp_path, "one", env)
            on_one = ModernClient(http, one)
            again = (await on_one.task("tasks/get", task_id))["result"]
            assert again["taskId"] == task_id

            # Cancelling the task cancels the job.
            ack = await on_two.task("tasks/cancel", task_id)
            assert ack["result"]["resultType"] == "complete"
            await on_two.call_tool("get_generation", {"name": task_id, "wait_seconds": 30})
            cancelled = (await on_two.task("tasks/get", task_id))["result"]
            assert cancelled["status"] == "cancelled"

            # A task that completes carries the tool result, images and all.
            quick = await on_two.call_tool(
                "generate_image", {"prompt": "a small task", "size": "256x256"}
            )
            await on_two.call_tool("get_generation", {"name": quick["taskId"], "wait_seconds": 30})
            done = (await on_one.task("tasks/get", quick["taskId"]))["result"]
            assert done["status"] == "completed"
            assert done["result"]["structuredContent"]["state"] == "completed"
            assert len(done["result"]["structuredContent"]["images"]) == 1
            # Read back on the replica that was restarted: the blob store is shared.
            kinds = [block["type"] for block in done["result"]["content"]]
            assert "image" in kinds, kinds
            ack = await on_one.task("tasks/update", quick["taskId"])
            assert ack["result"]["resultType"] == "complete"
    finally:
        for server in (one, two):
            server.terminate()
            await server.wait_exit(30)


async def test_task_status_notifications_on_a_listen_stream(slow: ServedProcess) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        client = ModernClient(http, slow)
        created = await client.call_tool(
            "generate_image", {"prompt": "a watched kettle", "size": "256x256"}
        )
        task_id = created["taskId"]
        reply = await client.request(
            "subscriptions/listen", {"notifications": {"taskIds": [task_id]}}
        )
        assert "result" in reply, reply
        frames = client.frames
    methods = [frame.get("method") for frame in frames]
    assert methods[0] == "notifications/subscriptions/acknowledged"
    assert frames[0]["params"]["notifications"]["taskIds"] == [task_id]
    tasks = [frame["params"] for frame in frames if frame.get("method") == "notifications/tasks"]
    assert tasks and all(task["taskId"] == task_id for task in tasks)
    assert tasks[-1]["status"] == "completed"
    assert tasks[-1]["result"]["structuredContent"]["state"] == "completed"
    assert all(task["status"] == "working" for task in tasks[:-1])
