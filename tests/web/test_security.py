"""Who may talk to `podsettle serve`: loopback by default, a token off loopback (and on every route,
the MCP mount included, whenever one is configured), and never a foreign Host or Origin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from typer.testing import CliRunner

from podsettle.application import Settlements
from podsettle.cli import app as cli
from podsettle.settings import Settings
from podsettle.web.app import create_app, serve_app
from podsettle.web.security import InsecureBind, is_loopback
from tests.web.conftest import clean_env, start_serve, stop_serve

TOKEN = "s3cret-token-for-tests-0123456789"
PORT = 8788
OWN = f"http://127.0.0.1:{PORT}"
JOB = "00000000-0000-4000-8000-000000000000"


class FakeMCP:
    """Stands in for `podsettle.mcp.http_app(settings)`: a Starlette app at /mcp with a lifespan."""

    def __init__(self) -> None:
        self.started = False

        @asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            self.started = True
            yield

        async def endpoint(request: Request) -> JSONResponse:
            return JSONResponse({"mcp": True, "path": request.url.path})

        self.app = Starlette(routes=[Route("/mcp", endpoint, methods=["GET", "POST"])], lifespan=lifespan)


@pytest.fixture
def settlements(tmp_path: Path) -> Settlements:
    return Settlements(f"sqlite:///{tmp_path / 'store.db'}")


def every_path(app: Any) -> list[str]:
    """A concrete path for every route of the dashboard (read off the app, so a new route is
    included), a static file, and the MCP mount."""
    site = app.app.site  # Guard -> _Mounts -> the Starlette site
    paths = [route.path.replace("{job_id}", JOB) for route in site.routes if hasattr(route, "methods")]
    assert {"/", "/api/overview", "/api/jobs", f"/api/jobs/{JOB}", "/api/settled"} <= set(paths)
    return [*paths, "/static/dashboard.js", "/static/index.html", "/mcp"]


@pytest.fixture
def guarded(settlements: Settlements) -> Iterator[tuple[TestClient, Any, FakeMCP]]:
    mcp = FakeMCP()
    app = create_app(settlements, port=PORT, loopback=True, token=TOKEN, mcp=mcp.app)
    with TestClient(app, base_url=OWN, follow_redirects=False) as client:
        yield client, app, mcp


# ---------------------------------------------------------------------------------------- serve


def test_serve_refuses_a_non_loopback_address_without_a_token(tmp_path: Path) -> None:
    runner = CliRunner()
    env = clean_env(PODSETTLE_STORE=f"sqlite:///{tmp_path / 'never.db'}")
    for host in ("0.0.0.0", "192.168.1.20", "::", "dashboard.example.com"):
        result = runner.invoke(cli, ["serve", "--host", host, "--port", "0"], env=env)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("podsettle: error: ")
        assert "not a loopback address" in lines[0] and "PODSETTLE_TOKEN" in lines[0]
    assert not (tmp_path / "never.db").exists()  # refused before the store was opened


def test_a_short_token_is_refused_without_showing_it(tmp_path: Path) -> None:
    env = clean_env(PODSETTLE_STORE=f"sqlite:///{tmp_path / 'never.db'}", PODSETTLE_TOKEN="tooshort")
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 2
    assert "PODSETTLE_TOKEN" in result.stderr and "16 characters" in result.stderr
    assert "tooshort" not in result.stderr + result.stdout


def test_what_counts_as_loopback() -> None:
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com")))


def test_a_server_off_loopback_cannot_be_built_without_a_token(settlements: Settlements) -> None:
    with pytest.raises(InsecureBind):
        create_app(settlements, port=PORT, loopback=False, token=None)


# ---------------------------------------------------------------------------------------- token


def test_with_a_token_every_route_refuses_a_call_without_it(
    guarded: tuple[TestClient, Any, FakeMCP],
) -> None:
    client, app, _ = guarded
    for path in every_path(app):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401, (path, headers, answer.status_code)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in answer.text
        assert client.post(path).status_code == 401
        assert client.get(path, params={"token": "wrong-token-0123456789"}).status_code == 401
        answer = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code in (200, 404), (path, answer.status_code)  # 404: no such job
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_the_browser_passes_the_token_once_and_keeps_a_cookie(
    guarded: tuple[TestClient, Any, FakeMCP],
) -> None:
    client, _, _ = guarded
    answer = client.get("/", params={"token": TOKEN, "batch": "b1"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/?batch=b1"  # the token leaves the address bar
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert client.get("/api/overview").status_code == 200  # the cookie stands for the token
    assert "podsettle" in client.get("/").text
    client.cookies.clear()
    assert client.get("/api/overview").status_code == 401
    client.cookies.set("podsettle_token", TOKEN)  # the token itself is not the cookie's value
    assert client.get("/api/overview").status_code == 401


def test_the_mcp_mount_is_behind_the_same_guard(guarded: tuple[TestClient, Any, FakeMCP]) -> None:
    client, _, mcp = guarded
    assert mcp.started  # its lifespan runs with the server's
    assert client.post("/mcp", json={}).status_code == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    answer = client.post("/mcp", json={}, headers=bearer)
    assert answer.status_code == 200 and answer.json() == {"mcp": True, "path": "/mcp"}
    foreign = client.post("/mcp", json={}, headers={**bearer, "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    rebound = client.post("/mcp", json={}, headers={**bearer, "Host": f"evil.example:{PORT}"})
    assert rebound.status_code == 403


def test_off_loopback_the_token_is_what_lets_a_request_in(settlements: Settlements) -> None:
    app = create_app(settlements, port=PORT, loopback=False, token=TOKEN)
    with TestClient(app, base_url=f"http://dashboard.example.com:{PORT}", follow_redirects=False) as client:
        for path in every_path(app)[:-1]:
            assert client.get(path).status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/overview", headers=bearer).status_code == 200
        own = {**bearer, "Origin": f"http://dashboard.example.com:{PORT}"}
        assert client.get("/api/overview", headers=own).status_code == 200
        other = {**bearer, "Origin": "http://evil.example"}
        assert client.get("/api/overview", headers=other).status_code == 403


# ---------------------------------------------------------------------------------------- loopback


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": f"evil.example:{PORT}"},  # a rebound name
        {"Host": "evil.example"},
        {"Host": "127.0.0.1"},  # not this port
        {"Host": f"127.0.0.1:{PORT + 1}"},
        {"Origin": "http://evil.example"},
        {"Origin": f"http://127.0.0.1:{PORT + 1}"},
        {"Origin": "null"},
    ],
)
def test_on_loopback_a_foreign_host_or_origin_is_refused(
    settlements: Settlements, headers: dict[str, str]
) -> None:
    app = create_app(settlements, port=PORT, loopback=True, token=None)
    with TestClient(app, base_url=OWN, follow_redirects=False) as client:
        for path in every_path(app)[:-1]:
            answer = client.get(path, headers=headers)
            assert answer.status_code == 403, (path, headers)
            assert "error" in answer.json()


def test_on_loopback_its_own_names_are_served(settlements: Settlements) -> None:
    app = create_app(settlements, port=PORT, loopback=True, token=None)
    with TestClient(app, base_url=OWN) as client:
        for host in (f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"[::1]:{PORT}"):
            assert client.get("/api/overview", headers={"Host": host}).status_code == 200
            origin = {"Host": host, "Origin": f"http://{host}"}
            assert client.get("/api/overview", headers=origin).status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "content-security-policy" in page.headers


# ---------------------------------------------------------------------------------------- the MCP hook


def test_serve_mounts_the_mcp_server_behind_the_same_guard(tmp_path: Path) -> None:
    """The real MCP server at /mcp of `serve`: refused without the token or from a foreign Origin,
    answering an MCP `initialize` with it."""
    store = f"sqlite:///{tmp_path / 'store.db'}"
    settings = Settings(store=store, sandbox=True, token=TOKEN)
    app = serve_app(Settlements(store), settings, host="127.0.0.1", port=PORT)
    hello = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-03-26",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    mcp = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    bearer = {**mcp, "Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url=OWN, follow_redirects=False) as client:
        assert client.post("/mcp", json=hello, headers=mcp).status_code == 401
        assert (
            client.post("/mcp", json=hello, headers={**bearer, "Origin": "http://evil.example"}).status_code
            == 403
        )
        answer = client.post("/mcp", json=hello, headers=bearer)
        assert answer.status_code == 200 and "serverInfo" in answer.text


# ---------------------------------------------------------------------------------------- a real server


def test_a_running_server_with_a_token(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    Settlements(store).close()
    served = start_serve(store, env=clean_env(PODSETTLE_TOKEN=TOKEN))
    try:
        assert httpx.get(f"{served.url}/api/overview").status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{served.url}/api/overview", headers=bearer).status_code == 200
        port = served.url.rsplit(":", 1)[1]
        rebound = {**bearer, "Host": f"evil.example:{port}"}
        assert httpx.get(f"{served.url}/api/overview", headers=rebound).status_code == 403
        entered = httpx.get(f"{served.url}/?token={TOKEN}")
        assert entered.status_code == 303 and entered.cookies.get("podsettle_token")
    finally:
        stop_serve(served)
