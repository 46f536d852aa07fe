"""The sandbox: a RunPod-compatible serverless API and a Purple Flea-compatible escrow API, served
from one port over real HTTP on loopback (DESIGN.md's sandbox contract).

`/v2/...` goes to the RunPod emulator; everything else (`/escrow`, `/api`, `/sandbox`, `/faucet`,
`/health`) to the escrow sandbox and its admin routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from podsettle.sandbox.escrow_server import create_escrow_app
from podsettle.sandbox.handlers import Handler
from podsettle.sandbox.http_server import BackgroundServer
from podsettle.sandbox.runpod_emulator import create_runpod_app
from podsettle.sandbox.runpod_worker import EndpointConfig

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class SandboxApp:
    """One ASGI app routing by path prefix to the RunPod emulator or the escrow sandbox.

    `endpoints` add RunPod endpoints to the built-in ones: an `EndpointConfig`, a handler,
    `"package.module:function"`, or the path of a RunPod worker file (or its folder), imported now
    (a `WorkerFileError` says why one cannot be)."""

    def __init__(
        self,
        *,
        ledger_path: str | None = None,
        endpoints: Mapping[str, EndpointConfig | str | Handler] | None = None,
        seed: int = 0,
        escrow_options: Mapping[str, Any] | None = None,
        runpod_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.escrow = create_escrow_app(ledger_path=ledger_path, seed=seed, **dict(escrow_options or {}))
        self.runpod = create_runpod_app(
            endpoints=dict(endpoints or {}), seed=seed, **dict(runpod_options or {})
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _no_lifespan(receive, send)
            return
        target = self.runpod if scope.get("path", "").startswith("/v2/") else self.escrow
        await target(scope, receive, send)


async def _no_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass(frozen=True)
class Agent:
    agent_id: str
    api_key: str
    referral_code: str | None = None  # the agent's own code, which others name as referral_code

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"Agent(agent_id={self.agent_id!r}, api_key='***')"


class Sandbox:
    """The sandbox served in this process, in a background thread, on an ephemeral loopback port."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **app_options: Any) -> None:
        self.app = SandboxApp(**app_options)
        self.server = BackgroundServer(self.app, host=host, port=port)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def runpod_url(self) -> str:
        """What `RUNPOD_ENDPOINT_BASE_URL` (and the SDK's `runpod.endpoint_url_base`) should be."""
        return f"{self.server.url}/v2"

    def start(self) -> Sandbox:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def create_agent(self, balance: str = "0") -> Agent:
        """A funded agent, through the admin route (as any other tool would make one)."""
        response = httpx.post(f"{self.url}/sandbox/agents", json={"balance": balance}, timeout=10)
        response.raise_for_status()
        body = response.json()
        return Agent(body["agent_id"], body["api_key"], body.get("referral_code"))

    def ledger(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/sandbox/ledger", timeout=10)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body
