"""The web front end of `podsettle serve`: the dashboard page, the JSON API it reads, and the MCP
endpoint at `/mcp` when the MCP server is installed, all behind one guard (web/security.py).

The JSON API is the page's only source: every figure on the page comes from one of the routes
below, and README's "Dashboard" section lists them. Amounts are strings with 6 places.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from podsettle.web.dashboard import BadQuery, Dashboard, NotFound
from podsettle.web.security import Guard, is_loopback

if TYPE_CHECKING:
    from podsettle.application import Settlements
    from podsettle.settings import Settings

STATIC = Path(__file__).parent / "static"
MCP_PATH = "/mcp"
_NO_STORE = {"cache-control": "no-store"}


def mcp_app(settings: Settings, *, host: str, port: int) -> ASGIApp:
    """The MCP server's StreamableHTTP application (`podsettle.mcp.http_app`), served at `/mcp` as
    it is: a request for `/mcp` or `/mcp/...` reaches it with its path unchanged, and its lifespan
    (the session manager) runs with the server's. Behind the guard; its own Host and Origin check
    admits the address the server is bound to (loopback's names on loopback)."""
    from podsettle.mcp import http_app

    if is_loopback(host):
        return http_app(settings, path=MCP_PATH)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return http_app(
        settings,
        path=MCP_PATH,
        allowed_hosts=[f"{shown}:{port}"],
        allowed_origins=[f"http://{shown}:{port}", f"https://{shown}:{port}"],
    )


def mcp_configured(settings: Settings) -> bool:
    """Whether the MCP tools have an engine to run: the embedded sandbox, or both services' keys.
    Without one, `serve` serves the dashboard alone (it only reads the store)."""
    return settings.sandbox or (settings.pf_api_key is not None and settings.runpod_api_key is not None)


def create_app(
    settlements: Settlements,
    *,
    port: int,
    loopback: bool,
    token: str | None,
    mcp: ASGIApp | None = None,
) -> ASGIApp:
    """The whole server for one store: the guard in front of the dashboard and, when given, `mcp`."""
    dashboard = Dashboard(settlements)
    api = _api(dashboard)
    mounts = {MCP_PATH: mcp} if mcp is not None else {}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await dashboard.start()
        try:
            async with AsyncExitStack() as stack:
                for mounted in mounts.values():
                    context = getattr(getattr(mounted, "router", None), "lifespan_context", None)
                    if context is not None:
                        await stack.enter_async_context(context(mounted))
                yield
        finally:
            dashboard.close()

    site = Starlette(
        routes=api, lifespan=lifespan, exception_handlers={BadQuery: _bad_query, NotFound: _not_found}
    )
    site.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(_Mounts(site, mounts), port=port, loopback=loopback, token=token)


def serve_app(settlements: Settlements, settings: Settings, *, host: str, port: int) -> ASGIApp:
    """`create_app` as `podsettle serve` runs it: the token from the settings, the MCP app if any."""
    token = settings.token.get_secret_value() if settings.token is not None else None
    mcp = mcp_app(settings, host=host, port=port) if mcp_configured(settings) else None
    return create_app(settlements, port=port, loopback=is_loopback(host), token=token, mcp=mcp)


class _Mounts:
    """`site`, except the paths of each mount (`/mcp`, `/mcp/...`), which go to that app unchanged."""

    def __init__(self, site: ASGIApp, mounts: dict[str, ASGIApp]) -> None:
        self.site = site
        self.mounts = mounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            for prefix, app in self.mounts.items():
                if path == prefix or path.startswith(prefix + "/"):
                    await app(scope, receive, send)
                    return
        await self.site(scope, receive, send)


# ---------------------------------------------------------------------------------------- routes


def _api(dashboard: Dashboard) -> list[Route]:
    async def index(request: Request) -> Response:
        """GET / — the dashboard page (static; it reads everything from the JSON API)."""
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def overview(request: Request) -> Response:
        """GET /api/overview[?batch=ID] — the log position the answer reflects (`position`: it moves
        whenever the store records an event, so the page polls this route and refetches the rest
        when it moved), the totals of one batch or of every job (`totals`, in the words of
        `podsettle totals --json`), the job count per state (`states`), and every batch's totals
        (`batches`, each with its `batch_id`; null for jobs run without a batch)."""
        return _json(await dashboard.overview(_text(request, "batch")))

    async def jobs(request: Request) -> Response:
        """GET /api/jobs[?batch=ID][&state=STATE][&limit=N][&offset=N] — jobs as the read model has
        them (the rows of `podsettle jobs --json`), the most recently changed first; `count` is how
        many match, `limit` (1..1000, default 200) and `offset` page through them. `state` is one of
        the lifecycle states (released, refunded, attention, ...); a wrong one is a 400 naming it."""
        return _json(
            await dashboard.jobs(
                batch_id=_text(request, "batch"),
                state=_text(request, "state"),
                limit=_int(request, "limit", 200),
                offset=_int(request, "offset", 0),
            )
        )

    async def job(request: Request) -> Response:
        """GET /api/jobs/{job_id} — one job as the log has it (`job`: the fields of `podsettle status
        --json`) and its timeline (`events`: every event in order, each with `version`, `event`, `at`
        and its own `fields`). 404 when the store has no such job, 400 when the id is not a UUID."""
        return _json(await dashboard.job(request.path_params["job_id"]))

    async def earnings(request: Request) -> Response:
        """GET /api/earnings — what each worker earned (`podsettle earnings --json`): `to_workers`
        (bonuses included), `bonus_net`, `still_held`, jobs and paid jobs; the highest earner first."""
        return _json(await dashboard.earnings())

    async def attention(request: Request) -> Response:
        """GET /api/attention — the jobs waiting for an operator (state attention): each job's fields,
        the `step` whose outcome is unknown, the `reason`, and what is `known`; resolve them with
        `podsettle reconcile --resolve`."""
        return _json(await dashboard.attention())

    async def settled(request: Request) -> Response:
        """GET /api/settled — money settled over time: `points`, each a tenth of a second in which
        escrows were released or refunded, with the cumulative `to_workers` (bonuses included) and
        `returned` (to the payer) up to it, at most 240 of them (thinned evenly; the last is kept);
        `to_workers` and `returned` are the sums so far, equal to the totals' figures once every job
        has settled."""
        return _json(await dashboard.settled_over_time())

    return [
        Route("/", index),
        Route("/api/overview", overview),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job_id}", job),
        Route("/api/earnings", earnings),
        Route("/api/attention", attention),
        Route("/api/settled", settled),
    ]


def _json(data: Any) -> Response:
    return JSONResponse(data, headers=_NO_STORE)


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value if value else None


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BadQuery(f"{name}: {value!r} is not a whole number") from None


async def _bad_query(request: Request, error: Exception) -> Response:
    return JSONResponse({"error": str(error)}, status_code=400, headers=_NO_STORE)


async def _not_found(request: Request, error: Exception) -> Response:
    return JSONResponse({"error": str(error)}, status_code=404, headers=_NO_STORE)
