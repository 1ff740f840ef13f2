"""The MCP server: the tools of `definitions.TOOLS` and the Tasks extension over a Backend.

Built on the SDK's low-level `Server`, so the JSON Schemas it lists are exactly the
ones `imagegen tools` prints. Each request is served with its caller's bearer token:
the HTTP request's `Authorization` header on Streamable HTTP, the configured token on
stdio (one local client per `imagegen mcp` process).

Idempotency: a tool call that carries no `request_id` gets one derived from who is
calling and which JSON-RPC request this is (see `derive_request_id`), so the same
request sent again (a transport retry) finds the job the first one made, while two
separate calls make two jobs. The identity is, in order: the `Mcp-Session-Id` the HTTP
face issued at initialize (it keeps no state for it, so any replica accepts it), the
stdio connection, else the client's declared name and version (2026-07-28 clients have
no session). The arguments are part of the hash: a reused JSON-RPC id with other
arguments is a different request, never an IMG_009 refusal.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from mcp.server.context import HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, compose_tool_call_handler
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
)

from imagegen.mcp.backend import Backend, ToolFailure
from imagegen.mcp.definitions import TOOLS_BY_NAME, ToolDefinition, mcp_tool_definitions
from imagegen.mcp.tasks import TasksExtension
from imagegen.mcp.tools import (
    CallContext,
    InvalidArguments,
    McpOptions,
    ToolRunner,
    error_result,
    parse_arguments,
)
from imagegen.v1 import generation_pb2

SERVER_NAME = "imagegen"
INSTRUCTIONS = (
    "imagegen makes and edits images and keeps them in your library. Job tools "
    "(generate_image, edit_image, generate_from_template) wait up to wait_seconds: if the "
    "job is not done by then they answer with its name, state and percent; resume with "
    "get_generation(name, wait_seconds). A retried call with the same request_id never runs "
    "or charges twice. Errors say whether retrying can help."
)
#: Derived request ids: a prefix that marks them, then hex (inside the contract's alphabet).
DERIVED_PREFIX = "mcp-"
_DERIVED_HEX_CHARS = 48


def derive_request_id(identity: str, jsonrpc_id: Any, tool: str, arguments: Any) -> str:
    """A request_id for a call that names none: the same for a re-sent request, different
    for any other call (another identity, JSON-RPC id, tool or arguments)."""
    material = json.dumps(
        [identity, jsonrpc_id, tool, arguments], sort_keys=True, separators=(",", ":"), default=str
    )
    return DERIVED_PREFIX + hashlib.sha256(material.encode()).hexdigest()[:_DERIVED_HEX_CHARS]


def _headers(ctx: ServerRequestContext[Any, Any]) -> Any:
    return getattr(ctx.request, "headers", None)


class _Core:
    """Per-server state the handlers share: the runner and how to identify callers."""

    def __init__(
        self, runner: ToolRunner, default_token: str | None, connection_id: str | None
    ) -> None:
        self.runner = runner
        self._default_token = default_token
        self._connection_id = connection_id

    def token_of(self, ctx: ServerRequestContext[Any, Any]) -> str:
        headers = _headers(ctx)
        if headers is not None:
            scheme, _, token = str(headers.get("authorization", "")).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        if self._default_token:
            return self._default_token
        # The HTTP face refuses unauthenticated requests before they get here.
        raise MCPError(INVALID_PARAMS, "no bearer token: send Authorization: Bearer <JWT>")

    def identity_of(self, ctx: ServerRequestContext[Any, Any]) -> str:
        headers = _headers(ctx)
        session = headers.get("mcp-session-id") if headers is not None else None
        if session:
            return f"session:{session}"
        if self._connection_id:
            return f"connection:{self._connection_id}"
        params = ctx.session.client_params
        if params is not None:
            return f"client:{params.client_info.name}/{params.client_info.version}"
        return "anonymous"

    def call_context(
        self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams
    ) -> CallContext:
        async def progress(percent: float, message: str) -> None:
            await ctx.session.report_progress(percent, 100, message)

        return CallContext(
            token=self.token_of(ctx),
            derived_request_id=derive_request_id(
                self.identity_of(ctx), ctx.request_id, params.name, params.arguments or {}
            ),
            progress=progress,
        )

    @staticmethod
    def tool_named(name: str) -> ToolDefinition:
        tool = TOOLS_BY_NAME.get(name)
        if tool is None:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {name}")
        return tool

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=[Tool.model_validate(d) for d in mcp_tool_definitions()])

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams
    ) -> HandlerResult:
        tool = self.tool_named(params.name)
        try:
            arguments = parse_arguments(tool, params.arguments)
        except InvalidArguments as exc:
            return _invalid_arguments(exc)
        return await self.runner.run(tool, arguments, self.call_context(ctx, params))

    async def submit_for_task(
        self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams
    ) -> generation_pb2.Generation | CallToolResult | None:
        tool = self.tool_named(params.name)
        if not tool.makes_job:
            return None
        try:
            arguments = parse_arguments(tool, params.arguments)
            return await self.runner.submit(tool, arguments, self.call_context(ctx, params))
        except InvalidArguments as exc:
            return _invalid_arguments(exc)
        except ToolFailure as failure:
            return error_result(failure)


def _invalid_arguments(exc: InvalidArguments) -> CallToolResult:
    text = f"IMG_003: {exc} Do not retry the same call: fix the arguments first."
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content={"error": {"code": "IMG_003", "message": str(exc), "retryable": False}},
        is_error=True,
    )


def _install(server: Server[Any], extension: Extension) -> None:
    """Apply an extension's methods and capability to a low-level server, as
    `MCPServer(extensions=...)` does for its own."""
    for binding in extension.methods():
        versions = binding.protocol_versions
        inner = binding.handler

        def gated(
            inner: Any = inner, versions: Any = versions, method: str = binding.method
        ) -> Any:
            async def handler(ctx: ServerRequestContext[Any, Any], params: Any) -> HandlerResult:
                if versions is not None and ctx.protocol_version not in versions:
                    raise MCPError(METHOD_NOT_FOUND, "Method not found", method)
                result: HandlerResult = await inner(ctx, params)
                return result

            return handler

        server.add_request_handler(binding.method, binding.params_type, gated())
    server.extensions[extension.identifier] = extension.settings()


def build_mcp_server(
    backend: Backend,
    options: McpOptions,
    *,
    default_token: str | None = None,
    connection_id: str | None = None,
    version: str = "",
) -> Server[Any]:
    """The MCP server over `backend`. `default_token` serves requests that carry no bearer
    token (stdio); `connection_id` identifies the one client of a stdio process."""
    core = _Core(ToolRunner(backend, options), default_token, connection_id)
    tasks = TasksExtension(core.runner, core.submit_for_task, core.token_of)
    server: Server[Any] = Server(
        SERVER_NAME,
        version=version,
        title="imagegen",
        instructions=INSTRUCTIONS,
        on_list_tools=core.list_tools,
        on_subscriptions_listen=tasks.listen,
        get_tool_input_schema=lambda name: (
            TOOLS_BY_NAME[name].input_schema if name in TOOLS_BY_NAME else None
        ),
    )
    server.add_request_handler(
        "tools/call", CallToolRequestParams, compose_tool_call_handler([tasks], core.call_tool)
    )
    _install(server, tasks)
    return server


async def run_stdio(address: str, token: str, options: McpOptions, *, version: str = "") -> None:
    """Serve one MCP client on stdin/stdout against the imagegen at `address`."""
    backend = Backend(address)
    try:
        server = build_mcp_server(
            backend,
            options,
            default_token=token,
            connection_id=secrets.token_hex(16),
            version=version,
        )
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        await backend.close()
