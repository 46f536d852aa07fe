"""The MCP server over StreamableHTTP: an ASGI app for `podsettle serve` to mount at `/mcp`.

Requests whose Host or Origin is not one of the allowed ones are refused (DNS rebinding, as the MCP
transport specification asks): by default only loopback names are allowed; a server that listens
elsewhere passes its own. The app's lifespan starts the engine and the session manager and stops
them; a host app that mounts it must run that lifespan inside its own (Starlette does not run the
lifespans of mounted apps):

    mcp = http_app(settings, path="/")
    app = Starlette(
        routes=[..., Mount("/mcp", app=mcp)],
        lifespan=lambda app: mcp.router.lifespan_context(mcp),
    )
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette

from podsettle.bootstrap import Engine
from podsettle.mcp.server import build_server
from podsettle.mcp.service import Service
from podsettle.settings import Settings

LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]")
LOOPBACK_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")


def security(
    allowed_hosts: Sequence[str] | None = None, allowed_origins: Sequence[str] | None = None
) -> TransportSecuritySettings:
    """Host and Origin checks: the given values (`name:*` allows any port), or loopback's."""
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=list(LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts),
        allowed_origins=list(LOOPBACK_ORIGINS if allowed_origins is None else allowed_origins),
    )


def http_app(
    settings: Settings,
    *,
    path: str = "/mcp",
    allowed_hosts: Sequence[str] | None = None,
    allowed_origins: Sequence[str] | None = None,
    engine: Engine | None = None,
) -> Starlette:
    """The StreamableHTTP ASGI app serving the tools at `path` ("/" when mounted at /mcp), on the
    engine the settings configure (or `engine`, started and closed by the app's lifespan)."""
    service = Service(settings, engine)
    server = build_server(service, path=path, security=security(allowed_hosts, allowed_origins))
    inner = server.streamable_http_app()

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with service, server.session_manager.run():
            yield

    return Starlette(routes=list(inner.routes), middleware=list(inner.user_middleware), lifespan=lifespan)
