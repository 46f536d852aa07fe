"""An MCP client session (the SDK's own client) on podsettle's MCP server over stdio (a
`podsettle mcp --sandbox` subprocess) or StreamableHTTP (the ASGI app served by uvicorn on a
loopback port), both on the embedded sandbox with a SQLite store."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from podsettle.bootstrap import Engine
from podsettle.mcp import http_app
from podsettle.settings import Settings

Connect = Callable[..., AbstractAsyncContextManager["Client"]]


class Client:
    """A session, and what the test can see of the server's side (its store, and over HTTP its engine)."""

    def __init__(self, session: ClientSession, store: str, engine: Engine | None) -> None:
        self.session = session
        self.store = store
        self.engine = engine

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        """The tool's JSON answer; fails the test on a tool error."""
        result = await self.session.call_tool(tool, arguments)
        assert not result.isError, f"{tool}: {text_of(result)}"
        data: dict[str, Any] = json.loads(text_of(result))
        return data

    async def error(self, tool: str, **arguments: Any) -> str:
        """The tool error's text; fails the test when the call succeeds."""
        result = await self.session.call_tool(tool, arguments)
        assert result.isError, f"{tool} should have failed: {text_of(result)[:300]}"
        return text_of(result)


def text_of(result: CallToolResult) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


def _environment(extra: dict[str, str]) -> dict[str, str]:
    """The test process's environment without any podsettle or service configuration, plus `extra`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("PODSETTLE_", "PF_", "RUNPOD_"))}
    return {**kept, "PODSETTLE_LOG_LEVEL": "ERROR", **extra}


@asynccontextmanager
async def _stdio(store: str, env: dict[str, str]) -> AsyncIterator[Client]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "podsettle.cli", "mcp", "--sandbox", "--store", store],
        env=_environment(env),
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield Client(session, store, None)


@asynccontextmanager
async def _http(store: str, env: dict[str, str]) -> AsyncIterator[Client]:
    settings = Settings.from_env({**env, "PODSETTLE_STORE": store, "PODSETTLE_SANDBOX": "1"})
    engine = Engine.sandbox(store)
    server = uvicorn.Server(
        uvicorn.Config(http_app(settings, engine=engine), host="127.0.0.1", port=0, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or serving.done():
                break
            await asyncio.sleep(0.02)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/mcp"
        async with streamable_http_client(url) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            client = Client(session, store, engine)
            client.url = url  # type: ignore[attr-defined]
            yield client
    finally:
        server.should_exit = True
        await serving


@pytest.fixture(params=["stdio", "http"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Connect:
    """`async with connect(**environment) as client:` a session on a new store."""
    opener = _stdio if request.param == "stdio" else _http
    counter = iter(range(100))

    def open_(**env: str) -> AbstractAsyncContextManager[Client]:
        return opener(f"sqlite:///{tmp_path / f'store-{next(counter)}.db'}", env)

    return open_
