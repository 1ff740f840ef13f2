"""imagegen's MCP face: the service's tools for agents, over stdio and Streamable HTTP.

An adapter over imagegen's own gRPC API (the `imagegen-client` distribution and the
generated `imagegen.v1` contract): every tool call becomes gRPC calls made with the
caller's bearer token, so it passes the same authentication, validation, limits,
credits and idempotency as any gRPC caller and adds no business rule of its own.

Public surface:
- `TOOLS`, `openai_tool_definitions()`, `mcp_tool_definitions()`: the tool definitions,
  one source for the MCP server and for `imagegen tools`.
- `build_mcp_server()`: the MCP server (tools and the Tasks extension) over a backend.
- `McpHttpServer`: Streamable HTTP at `/mcp`, stateless, on its own port.
- `run_stdio()`: serve one MCP client on stdin/stdout (`imagegen mcp`).
"""

from imagegen.mcp.definitions import TOOLS, mcp_tool_definitions, openai_tool_definitions
from imagegen.mcp.http import McpHttpServer
from imagegen.mcp.server import build_mcp_server, run_stdio

__all__ = [
    "TOOLS",
    "McpHttpServer",
    "build_mcp_server",
    "mcp_tool_definitions",
    "openai_tool_definitions",
    "run_stdio",
]
