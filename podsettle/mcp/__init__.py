"""podsettle's MCP server: tools for agents that pay for GPU work, over stdio (`podsettle mcp`) and
StreamableHTTP (`http_app`, mounted at `/mcp` of `podsettle serve`), on the official `mcp` SDK.

Importing this package loads the SDK; `import podsettle` alone never does.
"""

from __future__ import annotations

from podsettle.mcp.http import http_app, security
from podsettle.mcp.server import build_server
from podsettle.mcp.service import Service
from podsettle.mcp.stdio import serve_stdio

__all__ = ["Service", "build_server", "http_app", "security", "serve_stdio"]
