"""The StreamableHTTP app refuses a request whose Host or Origin is not allowed (DNS rebinding):
loopback names by default, the caller's list when it gives one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn

from podsettle.bootstrap import Engine
from podsettle.mcp import http_app
from podsettle.settings import Settings

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-03-26",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@asynccontextmanager
async def serving(allowed_hosts: Sequence[str] | None = None) -> AsyncIterator[str]:
    app = http_app(
        Settings(store="memory"),
        allowed_hosts=allowed_hosts,
        allowed_origins=None if allowed_hosts is None else ["https://dash.example"],
        engine=Engine.in_process("memory"),
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn stopped"
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        await task


async def post(url: str, **headers: str) -> int:
    async with httpx.AsyncClient() as client:
        answer = await client.post(url, json=INITIALIZE, headers={**HEADERS, **headers})
        return answer.status_code


@pytest.mark.timeout(60)
async def test_loopback_by_default_and_a_foreign_host_or_origin_is_refused() -> None:
    async with serving() as url:
        port = url.split(":")[2].split("/")[0]
        assert await post(url) == 200
        assert await post(url, Origin=f"http://localhost:{port}") == 200
        assert await post(url, Host=f"evil.example:{port}") == 421
        assert await post(url, Host="evil.example") == 421
        assert await post(url, Origin="http://evil.example") == 403
        assert await post(url, Origin=f"http://127.0.0.1.evil.example:{port}") == 403


@pytest.mark.timeout(60)
async def test_the_caller_sets_the_allowed_hosts_and_origins() -> None:
    async with serving(allowed_hosts=["dash.example:*"]) as url:
        port = url.split(":")[2].split("/")[0]
        assert await post(url, Host=f"dash.example:{port}", Origin="https://dash.example") == 200
        assert await post(url) == 421  # loopback is no longer on the list
        assert await post(url, Host=f"dash.example:{port}", Origin="http://evil.example") == 403
