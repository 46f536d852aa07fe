"""The MCP server over stdio (`podsettle mcp`): an MCP client starts it as a subprocess and speaks
JSON-RPC on its stdin and stdout (logs go to stderr, never stdout)."""

from __future__ import annotations

from podsettle.bootstrap import Engine
from podsettle.mcp.server import build_server
from podsettle.mcp.service import Service
from podsettle.settings import Settings


async def serve_stdio(settings: Settings, engine: Engine | None = None) -> None:
    """Serve the tools on stdin/stdout until the client closes them."""
    service = Service(settings, engine)
    server = build_server(service)
    async with service:
        await server.run_stdio_async()
