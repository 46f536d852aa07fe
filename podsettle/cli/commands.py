"""The `podsettle` command line.

Start-up stays quick: each command imports what it needs when it runs. A user error (a bad flag,
amount, JSON line or configuration, an unreachable service, a missing key) prints one line naming
what is wrong and exits 2 (usage or configuration) or 1 (failure), without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from podsettle.settings import Settings

T = TypeVar("T")
# The configuration of the command being run: read from the environment once, before it runs.
_SETTINGS: ContextVar[Settings | None] = ContextVar("podsettle_cli_settings", default=None)
# The store the command opened (shown without its password), to name it when it fails later.
_STORE_SHOWN: ContextVar[str | None] = ContextVar("podsettle_cli_store", default=None)


class _Commands(TyperGroup):
    """Every command runs inside `user_errors()`: a user's mistake is one line, never a traceback.
    The configuration is read and checked first, so a wrong variable is named whatever the command."""

    def invoke(self, ctx: Any) -> Any:
        from podsettle.settings import Settings
        from podsettle.support.logs import configure_logging

        with user_errors():
            settings = Settings.from_env()
            configure_logging(settings.log_level)  # stderr: stdout stays for results
            token = _SETTINGS.set(settings)
            try:
                return super().invoke(ctx)
            finally:
                _SETTINGS.reset(token)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _flags_as_flags(self, ctx)
        super().format_help(ctx, formatter)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command, with its on/off options shown as flags in `--help` (no `<bool>` value)."""
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _flags_as_flags(command, ctx)
        return command


def _flags_as_flags(command: Any, ctx: Any) -> None:
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # an empty type column: the option takes no value


def _settings() -> Settings:
    """The configuration of the running command (read now when a command is called directly)."""
    settings = _SETTINGS.get()
    if settings is None:
        from podsettle.settings import Settings

        with user_errors():
            settings = Settings.from_env()
    return settings


app = typer.Typer(
    cls=_Commands,
    name="podsettle",
    help="Escrow settlement for RunPod jobs: fund on start, pay on success, refund on failure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (amounts as strings), no progress bar.")]
StoreOption = Annotated[
    str | None,
    typer.Option("--store", help="Event store URL (default: $PODSETTLE_STORE or sqlite:///podsettle.db)."),
]
EXIT_FAILURE, EXIT_USAGE = 1, 2
DEMO_STORE = "sqlite:///podsettle-demo.db"


class UserError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        self.code = code
        super().__init__(message)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    raise UserError(message, code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one clear line and an exit code."""
    from pydantic import ValidationError

    from podsettle.adapters.persistence import StoreConfigError
    from podsettle.adapters.ports import GatewayError, Unauthorized
    from podsettle.domain.errors import DomainError, InvalidInput, JobNotFound
    from podsettle.settings import ConfigError, describe

    try:
        yield
    except UserError as error:
        _die(str(error), error.code)
    except (ConfigError, StoreConfigError) as error:
        _die(str(error), EXIT_USAGE)
    except ValidationError as error:
        _die(describe(error), EXIT_USAGE)
    except (InvalidInput, JobNotFound) as error:
        _die(str(error), EXIT_USAGE)
    except Unauthorized as error:
        _die(f"unauthorized: {error} (check the API keys)", EXIT_USAGE)
    except GatewayError as error:
        _die(f"{type(error).__name__}: {error}", EXIT_FAILURE)
    except DomainError as error:
        _die(str(error), EXIT_FAILURE)
    except OSError as error:
        _die(f"{error.strerror or error}: {getattr(error, 'filename', '') or ''}".rstrip(": "), EXIT_FAILURE)
    except Exception as error:
        cause = _store_failure(error)
        if cause is None:
            raise
        _die(cause, EXIT_USAGE)


def _store_failure(error: Exception) -> str | None:
    """One line for a failure of the event store met after it was opened (a file replaced, a server
    gone), naming the store; None when `error` is not the store's."""
    import sqlite3

    persistence = sys.modules.get("eventsourcing.persistence")
    ours = isinstance(error, sqlite3.Error) or (
        persistence is not None and isinstance(error, persistence.PersistenceError)
    )
    if not ours:
        return None
    from podsettle.adapters.persistence import postgres_cause

    store = _STORE_SHOWN.get() or "(the configured store)"
    return f"store {store}: {postgres_cause(error)}"


def _die(message: str, code: int) -> NoReturn:
    typer.echo(f"podsettle: error: {message}", err=True)
    raise typer.Exit(code)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    with user_errors():
        return asyncio.run(coroutine)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def show_progress(json_output: bool) -> bool:
    return not json_output and sys.stderr.isatty()


def _store(store: str | None) -> str:
    """The store's URL, checked: a wrong URL or a store that cannot be opened (not a database, not
    writable, its server down, its database missing, credentials refused) is one line and exit 2,
    within seconds, before any command touches it."""
    from podsettle.adapters.persistence import check_store, store_from_url

    url = store or _settings().store
    parsed = store_from_url(url, _source(store))  # validates, naming where the URL came from
    _STORE_SHOWN.set(parsed.url)
    check_store(parsed)
    return url


def _paying_store(store: str | None, command: str) -> str:
    """The store for a command that moves money: never `memory`, whose log is gone when the command
    exits, so the same `--key` (or batch) run again would fund and pay a second time."""
    from podsettle.adapters.persistence import store_from_url

    url = _store(store)
    if store_from_url(url).kind == "popo":
        fail(
            f"{command}: a memory store keeps no log after this command, so a key could be paid twice; "
            "use --store sqlite:///podsettle.db (or PODSETTLE_STORE) for commands that move money"
        )
    return url


async def _check_services(engine: Any, endpoint: str) -> None:
    """The services answer, and the endpoint exists (an unknown one is a usage error: exit 2)."""
    from podsettle.adapters.ports import NotFound

    try:
        await engine.check_services(endpoint)
    except NotFound:
        fail(f"--endpoint {endpoint}: the RunPod service has no such endpoint (check the endpoint id)")


@contextmanager
def _reused(option: str, value: str | None) -> Iterator[None]:
    """A key or batch id already used for a different job: say which option to change."""
    from podsettle.domain.errors import ConflictingOutcome

    try:
        yield
    except ConflictingOutcome as error:
        if error.command != "open":
            raise
        shown = f" {value!r}" if value else ""
        fail(
            f"{option}{shown} was already used for a different job (another input, budget, payee or "
            f"endpoint), which is now {error.state}: give a new {option}, or the same input to see "
            "that job again"
        )


def _source(store: str | None) -> str:
    return "--store" if store else "PODSETTLE_STORE"


def _parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        fail(f"{what}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})")
    if not isinstance(value, dict):
        fail(f"{what}: must be a JSON object, not {type(value).__name__}")
    return value


def _engine(**overrides: Any) -> Any:
    from podsettle.bootstrap import Engine
    from podsettle.settings import Settings

    return Engine.from_env(Settings.from_env(**overrides))


# ---------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    jobs: Annotated[int, typer.Option("--jobs", min=1, max=500, help="How many jobs in the batch.")] = 24,
    json_output: JsonFlag = False,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="Event store URL for the demo: empty, or written by an earlier demo "
            "(default: sqlite:///podsettle-demo.db).",
        ),
    ] = DEMO_STORE,
    seed: Annotated[int, typer.Option(help="Seed of the simulated failures.")] = 7,
) -> None:
    """Run a batch on the embedded sandbox (no network, no keys): fund, run, pay or refund, a bonus,
    the totals and the audit. Refuses a store holding events the demo did not write."""
    from podsettle.adapters.persistence import store_from_url
    from podsettle.cli.demo import prepare_store, run_demo

    with user_errors():
        store_from_url(store, "--store")
        prepare_store(store, "--store", env=_settings().store_env())
        outcome = asyncio.run(run_demo(store, jobs=jobs, seed=seed, json_output=json_output))
    raise typer.Exit(0 if outcome else EXIT_FAILURE)


# ---------------------------------------------------------------------------------------- sandbox


_ESCROW_ROUTES = ("create", "complete", "release", "dispute", "cancel", "faucet")
# "Off": a limit no sandbox run reaches (the escrow sandbox takes a number per route, not none).
_NO_LIMIT = 1_000_000_000


@app.command()
def sandbox(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port for both APIs.")] = 8787,
    ledger: Annotated[
        str | None, typer.Option(help="SQLite file for the escrow ledger (default: memory).")
    ] = None,
    endpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--endpoint",
            metavar="NAME=PATH",
            help="Serve a RunPod worker file (or its folder) unchanged as endpoint NAME; repeatable.",
        ),
    ] = None,
    rate_limits: Annotated[
        str,
        typer.Option(
            "--rate-limits",
            metavar="faithful|off|ROUTE=N,...",
            help="Escrow calls per minute: as the service (faithful: 20 creates a minute), off (no limits,"
            " RunPod's either), or per route, e.g. create=1000,release=1000.",
        ),
    ] = "faithful",
    dispute_review: Annotated[
        str,
        typer.Option(
            "--dispute-review",
            metavar="manual|refund|release",
            help="A dispute waits for POST /sandbox/disputes/ID/resolve (manual, as the service's staff)"
            " or is decided at once.",
        ),
    ] = "manual",
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=1000, help="Workers of every endpoint (default 4).")
    ] = None,
    faults: Annotated[
        str | None,
        typer.Option(
            "--faults",
            metavar="SEED[/NAME=VALUE,...]",
            help="Seeded RunPod faults on every endpoint, e.g. 7/failure_rate=0.1,http_5xx_rate=0.02"
            " (names: GET /v2/ENDPOINT/_faults).",
        ),
    ] = None,
    sweep_every: Annotated[
        float | None,
        typer.Option(
            "--sweep-every",
            min=0.001,
            metavar="SECONDS",
            help="Run the escrow timeout sweep every SECONDS of the sandbox clock (the service: 300).",
        ),
    ] = None,
    clock_speed: Annotated[
        float,
        typer.Option(
            "--clock-speed",
            min=1.0,
            max=100_000.0,
            metavar="X",
            help="The escrow clock runs X times faster, so escrows reach their timeout (an hour or"
            " more) and the sweep refunds them in minutes (60: an hour a minute).",
        ),
    ] = 1.0,
) -> None:
    """Serve the RunPod-compatible and Purple Flea-compatible sandbox APIs on one port."""
    with user_errors():
        import socket

        import uvicorn

        from podsettle.sandbox.app import SandboxApp

        mounted = _endpoint_options(endpoint or [])
        escrow_options, runpod_options, seed = _sandbox_options(
            rate_limits, dispute_review, sweep_every, clock_speed
        )
        endpoints, seed = _sandbox_endpoints(mounted, workers, faults, seed)
        try:
            sandbox_app = SandboxApp(
                ledger_path=ledger,
                endpoints=endpoints,
                seed=seed,
                escrow_options=escrow_options,
                runpod_options=runpod_options,
            )
        except ValueError as error:  # a worker file that cannot be mounted, a bad endpoint name
            fail(str(error))
        # Bound before the banner: a port in use is one line, not a banner for a server that is not.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as error:
            sock.close()
            fail(f"--host {host} --port {port}: {error.strerror or error} (choose another --port)")
        bound = sock.getsockname()[1]
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        _sandbox_banner(f"http://{shown}:{bound}", mounted, rate_limits, dispute_review, clock_speed)
        sys.stdout.flush()
        config = uvicorn.Config(sandbox_app, log_level="warning", lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])


def _sandbox_options(
    rate_limits: str, dispute_review: str, sweep_every: float | None, clock_speed: float
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The sandbox's own options from the command's: (escrow options, RunPod options, seed)."""
    escrow: dict[str, Any] = {}
    runpod: dict[str, Any] = {}
    text = rate_limits.strip().lower()
    if text == "off":
        escrow["rate_limits"] = dict.fromkeys(_ESCROW_ROUTES, _NO_LIMIT)
        runpod["rate_limits"] = {}
    elif text != "faithful":
        limits: dict[str, int] = {}
        for pair in (item.strip() for item in text.split(",") if item.strip()):
            route, sep, number = pair.partition("=")
            if not sep or route.strip() not in _ESCROW_ROUTES or not number.strip().isdigit():
                fail(
                    f"--rate-limits: {pair!r} is not ROUTE=CALLS_PER_MINUTE "
                    f"(routes: {', '.join(_ESCROW_ROUTES)}), nor faithful or off"
                )
            if int(number) < 1:
                fail(f"--rate-limits: {pair!r}: a limit is at least 1 (or use --rate-limits off)")
            limits[route.strip()] = int(number)
        escrow["rate_limits"] = limits
    if dispute_review not in ("manual", "refund", "release"):
        fail(f"--dispute-review: {dispute_review!r} is not one of manual, refund, release")
    if dispute_review != "manual":
        escrow["dispute_review"] = dispute_review
    if sweep_every is not None:
        escrow["sweep_interval_s"] = sweep_every
    if clock_speed != 1.0:
        from datetime import UTC, datetime

        started = datetime.now(UTC)
        escrow["clock"] = lambda: started + (datetime.now(UTC) - started) * clock_speed
    return escrow, runpod, 0


def _sandbox_endpoints(
    mounted: dict[str, str], workers: int | None, faults: str | None, seed: int
) -> tuple[dict[str, Any], int]:
    """Every endpoint the sandbox serves, with `--workers` and `--faults` applied (built-in ones
    too), and the seed of the faults' draws."""
    from pydantic import ValidationError

    from podsettle.sandbox.handlers import BUILTIN_HANDLERS
    from podsettle.sandbox.runpod_worker import EndpointConfig, Faults

    if workers is None and faults is None:
        return dict(mounted), seed
    plan = Faults()
    if faults is not None:
        seed_text, _, spec = faults.partition("/")
        if not seed_text.strip().isdigit():
            fail(f"--faults: {faults!r} does not start with a seed (a whole number), e.g. 7/failure_rate=0.1")
        seed = int(seed_text)
        values: dict[str, str] = {}
        for pair in (item.strip() for item in spec.split(",") if item.strip()):
            name, sep, value = pair.partition("=")
            if not sep:
                fail(f"--faults: {pair!r} is not NAME=VALUE")
            values[name.strip()] = value.strip()
        try:
            plan = Faults.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            fail(f"--faults: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    count = workers or EndpointConfig.workers
    handlers: dict[str, Any] = {**BUILTIN_HANDLERS, **mounted}
    return {
        name: EndpointConfig(handler=handler, workers=count, faults=plan.model_copy())
        for name, handler in handlers.items()
    }, seed


def _sandbox_banner(
    base: str, mounted: dict[str, str], rate_limits: str, dispute_review: str, clock_speed: float
) -> None:
    for name, path in mounted.items():
        typer.echo(f"Endpoint {name}: {path}  ->  {base}/v2/{name}/run")
    typer.echo(f"RunPod serverless API:  {base}/v2   (RUNPOD_ENDPOINT_BASE_URL; any non-empty key)")
    typer.echo(f"Purple Flea escrow API: {base}       (PODSETTLE_ESCROW_URL; dialects v1 and seed)")
    typer.echo(f"Escrow rate limits: {rate_limits}; disputes: {dispute_review}; clock: x{clock_speed:g}")
    typer.echo("Admin routes (no key; sandbox only):")
    for route, what in (
        ('POST /sandbox/agents {"balance": "100.00"}', "a funded agent: its id and key"),
        ("GET  /sandbox/ledger", "every balance and hold; conserved: true"),
        ("POST /sandbox/disputes/ESCROW_ID/resolve", '{"outcome": "refund"|"release"}: a manual review'),
        ('POST /sandbox/clock {"advance_s": 3600}', "move the escrow clock forward"),
        ("POST /sandbox/sweep", "run the timeout sweep now"),
        ("GET|POST|DELETE /sandbox/faults", '{"route": "create", "mode": "error_before", "count": 3}'),
        ("GET|POST|DELETE /v2/ENDPOINT/_faults", "RunPod faults of one endpoint"),
    ):
        typer.echo(f"  {route:<44} {what}")
    typer.echo(f"Stop with Ctrl-C.  Admin base: {base}")


def _endpoint_options(values: list[str]) -> dict[str, str]:
    """`--endpoint NAME=PATH` options as {name: path}; a name given twice is a usage error."""
    mounted: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            fail(f"--endpoint takes NAME=path/to/worker.py, got {value!r}")
        if name in mounted:
            fail(f"--endpoint {name} is given twice")
        mounted[name] = path
    return mounted


# ---------------------------------------------------------------------------------------- serve


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback by default; any other needs PODSETTLE_TOKEN).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8788,
    store: StoreOption = None,
) -> None:
    """Serve the live dashboard of a store and its JSON API (and the MCP endpoint at /mcp)."""
    import socket

    from podsettle.web.security import InsecureBind, require_token_off_loopback

    settings = _settings()
    with user_errors():
        try:
            require_token_off_loopback(host, settings.token.get_secret_value() if settings.token else None)
        except InsecureBind as error:
            fail(str(error))
    settlements = _settlements(store)
    with user_errors():
        import uvicorn

        from podsettle.web.app import mcp_configured, serve_app

        # Bound here, before the app is built: its Host check needs the port (0 picks one).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as error:
            sock.close()
            fail(f"--host {host} --port {port}: {error.strerror or error}", EXIT_FAILURE)
        bound = sock.getsockname()[1]
        web = serve_app(settlements, settings, host=host, port=bound)
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        typer.echo(f"podsettle dashboard: http://{shown}:{bound}/   (JSON API under /api; Ctrl-C stops)")
        if mcp_configured(settings):
            typer.echo(f"MCP (StreamableHTTP): http://{shown}:{bound}/mcp")
        else:
            typer.echo("MCP at /mcp: off (needs PF_API_KEY and RUNPOD_API_KEY, or PODSETTLE_SANDBOX=1)")
        sys.stdout.flush()
        config = uvicorn.Config(
            web,
            log_level="warning",
            access_log=False,
            lifespan="on",
            proxy_headers=False,  # no proxy to trust: the Host check must see what the client sent
            server_header=False,
        )
        uvicorn.Server(config).run(sockets=[sock])


# ---------------------------------------------------------------------------------------- jobs


@app.command("run")
def run_job(
    endpoint: Annotated[str, typer.Option("--endpoint", help="RunPod endpoint id.")],
    input_json: Annotated[str, typer.Option("--input", help="The job input, a JSON object.")],
    budget: Annotated[str, typer.Option("--budget", help="USDC to escrow, e.g. 0.50.")],
    payee: Annotated[
        str | None, typer.Option(help="Worker agent to pay (default: $PODSETTLE_PAYEE).")
    ] = None,
    referral: Annotated[str | None, typer.Option(help="Referral code.")] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Idempotency key: the same key never pays twice.")
    ] = None,
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Fund an escrow, run one job, and pay the worker (exit 0) or refund (exit 1).

    On the published Purple Flea service a refund comes back through its timeout sweep: after the
    escrow's timeout (the job's deadline plus an hour, in whole hours) and up to 5 minutes more, less
    the 1% commission, which the service keeps (PODSETTLE_REFUND_METHOD=dispute instead freezes the
    escrow for Purple Flea's staff: no route of the service resolves a dispute)."""
    from podsettle.domain.money import to_money

    job_input = _parse_json_object(input_json, "--input")
    with user_errors():
        to_money(budget, "--budget", allow_zero=False)

    url = _paying_store(store, "run")

    async def go() -> Any:
        async with _engine(store=url) as engine:
            await _check_services(engine, endpoint)
            with _reused("--key", key):
                return await engine.run_paid_job(
                    endpoint, job_input, budget, payee=payee, referral=referral, job_key=key
                )

    from podsettle.cli.stopping import outage_lines

    with outage_lines(_user_log_level()):
        result = run(go())
    if json_output:
        emit_json(result.to_json())
    else:
        from podsettle.cli.console import print_job

        print_job(result)
    _explain_refunds([result])
    raise typer.Exit(0 if result.paid else EXIT_FAILURE)


def _user_log_level() -> str | None:
    """PODSETTLE_LOG_LEVEL when the user set it (then the engine's JSON lines are wanted), else None."""
    settings = _settings()
    return settings.log_level if "log_level" in settings.model_fields_set else None


def _report_stop(
    signal_name: str, finished: int, total: int, store: str | None, *, unopened: int = 0, again: str = ""
) -> None:
    """After a stop by a signal: what is done, what is left, and the command that finishes it (for a
    batch with `unopened` jobs not opened yet, `again`, the batch run again: `resume` knows only the
    jobs in the log)."""
    left = total - finished
    typer.echo(
        f"podsettle: stopped by {signal_name}: {finished} of {total} job(s) finished, {left} left "
        "(each one's escrow and progress are in the log)",
        err=True,
    )
    if not left:
        return
    where = f" --store {store}" if store else ""
    if unopened and again:
        typer.echo(
            f"podsettle: {unopened} of them are not opened yet; to finish the batch, run it again "
            f"with its id: {again}{where}",
            err=True,
        )
        return
    typer.echo(f"podsettle: to finish them: podsettle resume{where}", err=True)


def _explain_refunds(results: list[Any]) -> None:
    """On stderr (stdout may be JSON): how the refunds still due will come back, and warnings."""
    for warning in {w for result in results for w in result.warnings}:
        typer.echo(f"podsettle: warning: {warning}", err=True)
    waiting = [r for r in results if r.state == "REFUNDING"]
    if waiting:
        from podsettle.engine import refund_terms

        method = waiting[0].view.refund_method or "timeout"
        terms = refund_terms(method, cancel=method == "cancel")
        typer.echo(
            f"podsettle: {len(waiting)} refund(s) still due: {terms}; `podsettle resume` records them",
            err=True,
        )


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="JSON Lines: one job input (a JSON object) per line.")],
    endpoint: Annotated[str, typer.Option("--endpoint", help="RunPod endpoint id.")],
    budget: Annotated[str, typer.Option("--budget", help="USDC to escrow per job.")],
    concurrency: Annotated[int, typer.Option(min=1, max=10_000, help="Jobs in flight at once.")] = 32,
    payee: Annotated[
        str | None, typer.Option(help="Worker agent to pay (default: $PODSETTLE_PAYEE).")
    ] = None,
    batch_id: Annotated[str | None, typer.Option("--batch-id", help="Re-use to resume a batch.")] = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, max=100_000, help="Jobs opened per atomic save.")
    ] = 200,
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Run a batch of jobs and settle each; prints the totals. Exit 1 when any job was not paid.

    The file is read as the jobs are opened (a batch of any size runs in flat memory), after a first
    pass that checks every line. Jobs are opened in chunks, each chunk whole or not at all; the same
    --batch-id run again continues after the last chunk opened. With --json the jobs are written as
    they settle (in that order), then the totals.

    Refunds on the published Purple Flea service come back through its timeout sweep: after each
    escrow's timeout (the job's deadline plus an hour, in whole hours) and up to 5 minutes more, less
    the 1% commission, which the service keeps."""
    from podsettle.cli.batch_io import JobsFile, JsonBatch, RestNotes
    from podsettle.domain.money import to_money

    jobs = JobsFile(file)
    with user_errors():
        to_money(budget, "--budget", allow_zero=False)

    url = _paying_store(store, "batch")
    from podsettle.cli.stopping import Stop, outage_lines

    stop = Stop()
    finished = 0
    notes = RestNotes()
    made: list[Any] = []  # the batch's stream, once made
    output: list[JsonBatch] = []  # the --json document, once its batch id is known

    def one_done(advance: Any) -> None:
        nonlocal finished
        finished += 1
        advance()

    async def go() -> Any:
        from podsettle.batches import BadBatchInput
        from podsettle.cli.console import progress

        with stop.catching():
            try:
                async with _engine(store=url) as engine:
                    await _check_services(engine, endpoint)
                    with (
                        _reused("--batch-id", batch_id),
                        progress(len(jobs), "settling", enabled=show_progress(json_output)) as advance,
                    ):
                        stream = engine.stream_batch(
                            endpoint,
                            jobs,
                            budget,
                            payee=payee,
                            concurrency=concurrency,
                            batch_id=batch_id,
                            chunk_size=chunk_size,
                            on_result=lambda _: one_done(advance),
                        )
                        made.append(stream)
                        if json_output:
                            output.append(JsonBatch(stream.batch_id))
                        try:
                            async for result in stream:
                                notes.add(result)
                                if output:
                                    output[0].job(result.to_json())
                        except BadBatchInput as error:
                            fail(f"{file} line {jobs.line_of(error.index)}: {error.inner}")
                        return stream
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if stop.signal is None or task is None:
                    raise
                task.uncancel()  # stopped by a signal: the engine has saved what it had
                return None

    with outage_lines(_user_log_level()):
        try:
            stream = run(go())
        except typer.Exit:
            if output and output[0].begun:  # an error ended the batch: the document says so
                output[0].close(made[0].totals.to_json(), stopped="error")
            raise
    if stream is None:
        assert stop.signal is not None
        if output:
            output[0].close(made[0].totals.to_json(), stopped=stop.signal.name)
        unopened = len(jobs) - (made[0].opened if made else 0)
        again = ["podsettle", "batch", str(file), "--endpoint", endpoint, "--budget", budget]
        named = made[0].batch_id if made else batch_id
        again += ["--batch-id", named] if named else []
        _report_stop(stop.signal.name, finished, len(jobs), store, unopened=unopened, again=shlex.join(again))
        raise typer.Exit(stop.exit_code)
    if output:
        output[0].close(stream.totals.to_json())
    else:
        from podsettle.cli.console import print_totals

        print_totals(stream.totals, title=f"batch {stream.batch_id}")
    notes.explain()
    if stream.cancelled:
        typer.echo(
            f"podsettle: batch {stream.batch_id} was cancelled: it opened {stream.opened} of the "
            f"{len(jobs)} job(s) of {file} and no more",
            err=True,
        )
    raise typer.Exit(
        0 if stream.totals.paid_jobs == stream.totals.jobs and not stream.cancelled else EXIT_FAILURE
    )


@app.command()
def bonus(
    job_id: Annotated[str, typer.Argument(help="A paid job's id.")],
    baseline: Annotated[str, typer.Option(help="The baseline metric, e.g. 0.80.")],
    achieved: Annotated[str, typer.Option(help="The metric the worker achieved, e.g. 0.92.")],
    pool: Annotated[str, typer.Option(help="The bonus pool in USDC (the most it can be).")] = "5",
    threshold: Annotated[str, typer.Option(help="Bonus only at achieved >= threshold x baseline.")] = "1.10",
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Pay the performance bonus on a paid job (once)."""
    from podsettle.domain.errors import InvalidInput

    url = _paying_store(store, "bonus")

    async def go() -> Any:
        async with _engine(store=url) as engine:
            try:
                return await engine.award_bonus(job_id, baseline, achieved, pool, threshold=threshold)
            except InvalidInput as error:  # named as the user typed it, not as the engine calls it
                flag = _BONUS_FLAGS.get(error.field)
                if flag is None:
                    raise
                fail(f"{flag}: {error.reason}")

    result = run(go())
    if json_output:
        emit_json(result.to_json())
    else:
        typer.echo(f"bonus {result.bonus_gross:f} USDC ({result.reason}): {result.status}")
    raise typer.Exit(0 if result.status in ("awarded", "none") else EXIT_FAILURE)


_BONUS_FLAGS = {
    "base_metric": "--baseline",
    "achieved_metric": "--achieved",
    "threshold": "--threshold",
    "pool": "--pool",
    "job_id": "JOB_ID",
}


CANCEL_FOLLOW_S = 30.0  # how long `cancel` waits for jobs being funded to be cancellable
CANCEL_RESCAN_S = 1.0  # `cancel --batch` looks again this much later for jobs the batch opened meanwhile


@app.command()
def cancel(
    job_id: Annotated[str | None, typer.Argument(help="The job to cancel (its id).")] = None,
    batch: Annotated[
        str | None, typer.Option("--batch", help="Cancel every job of this batch that can be.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the log).")] = "cancelled by the user",
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Cancel a job (or those of a batch): one still waiting to be funded ends with nothing funded,
    a funded or running one is cancelled on RunPod and its escrow refunded; works while the batch
    runs in another terminal. Exit 1 when any job could not be cancelled or ended other than
    refunded or rejected."""
    from podsettle.domain.errors import DomainError
    from podsettle.domain.lifecycle import State, status_of

    if (job_id is None) == (batch is None):
        fail("cancel takes a JOB_ID or --batch BATCH_ID (one of them)")
    url = _paying_store(store, "cancel")
    settlements = _settlements(url)

    def cancellable(job: Any) -> bool:
        # A job whose escrow create is under way can be cancelled only once its outcome is known.
        waiting = job.state == State.FUNDING and job.intent is not None and not job.awaiting_outcome
        return waiting or job.state in (State.FUNDED, State.RUNNING)

    with user_errors():
        if job_id is not None:
            job = settlements.get_job(_job_id(settlements, job_id))
            if not cancellable(job):
                being_funded = " (its escrow is being created: try again once it is funded)"
                fail(
                    f"job {job.id} is {job.state}{being_funded if job.state == State.FUNDING else ''}: only "
                    "a job waiting to be funded, FUNDED or RUNNING can be cancelled",
                    EXIT_FAILURE,
                )
            targets, skipped = [job.id], []
        else:
            found = [settlements.get_job(i) for i in settlements.job_ids(batch_id=batch)]
            if not found:
                fail(f"--batch {batch}: no job of that batch is in the store")
            # Jobs being funded too: they are cancelled once funded (below).
            chosen = [job for job in found if cancellable(job) or job.state == State.FUNDING]
            targets = [job.id for job in chosen]
            skipped = [job for job in found if job not in chosen and status_of(job.state) == "in_flight"]

    async def go() -> list[Any]:
        engine = _engine(store=url)
        # Only these jobs: the engine must not pick up the store's other unfinished jobs (it would
        # fund the jobs a batch running elsewhere has queued). Set before it starts.
        engine.recover_on_start = False
        engine.follow_log = False
        async with engine:
            done: list[Any] = []
            pending = list(targets)
            seen = set(targets)
            # A batch running elsewhere funds its next jobs while these are cancelled: those whose
            # escrow was being created are cancelled once funded (looked at again for a while). It
            # may open a chunk more before it sees its jobs cancelled: those are cancelled too.
            deadline = asyncio.get_running_loop().time() + CANCEL_FOLLOW_S
            while True:
                if batch is not None and not pending and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(CANCEL_RESCAN_S)
                    fresh = [
                        settlements.get_job(i) for i in settlements.job_ids(batch_id=batch) if i not in seen
                    ]
                    pending = [j.id for j in fresh if cancellable(j) or j.state == State.FUNDING]
                    seen.update(j.id for j in fresh)
                    skipped.extend(
                        j for j in fresh if j.id not in pending and status_of(j.state) == "in_flight"
                    )
                if not pending:
                    break
                # The jobs waiting to be funded first: cancelling them is immediate, and the batch
                # then has no more of them to fund.
                jobs = sorted(
                    (settlements.get_job(i) for i in pending), key=lambda j: j.state != State.FUNDING
                )
                pending = []
                for job in jobs:
                    try:
                        done.append(await engine.cancel(job.id, reason))
                    except DomainError:  # its create was sent meanwhile: once it is funded
                        pending.append(job.id)
                if pending and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.2)
                    current = [settlements.get_job(i) for i in pending]
                    pending = [j.id for j in current if cancellable(j) or j.state == State.FUNDING]
                elif pending:
                    skipped.extend(settlements.get_job(i) for i in pending)
                    break
            return done

    results = run(go()) if targets else []
    if json_output:
        emit_json([r.to_json() for r in results])
    else:
        for result in results:
            typer.echo(f"{result.job_id}  {result.status}")
        if batch is not None and not targets:
            typer.echo(f"batch {batch}: no job waits to be funded, is funded or running; nothing to cancel")
    if skipped:
        states = ", ".join(sorted({job.state for job in skipped}))
        typer.echo(
            f"podsettle: {len(skipped)} job(s) of batch {batch} could not be cancelled now ({states}): "
            "run cancel again once they run",
            err=True,
        )
    _explain_refunds(results)
    ok = not skipped and all(r.status in ("refunded", "refunding", "rejected") for r in results)
    raise typer.Exit(0 if ok else EXIT_FAILURE)


@app.command()
def resume(store: StoreOption = None, json_output: JsonFlag = False) -> None:
    """Finish every job an engine left unfinished (after a crash or a stop). An escrow service that
    cannot be reached fails it as it fails `run` (exit 1), before any job is touched."""
    from podsettle.cli.console import progress

    url = _paying_store(store, "resume")

    async def go() -> Any:
        engine = _engine(store=url)
        try:
            # As `run` checks before it opens anything: the engine starts (and resumes) only after.
            await engine.escrow.health()
        except BaseException:
            await engine.aclose()
            raise
        async with engine:
            with contextlib.ExitStack() as stack:
                advance: list[Callable[[], None]] = []

                def started(jobs: int, waiting: str | None) -> None:
                    # What the resume does, on stderr, before it waits (it may wait for claims).
                    if not json_output:
                        typer.echo(f"resuming {jobs} unfinished job(s)", err=True)
                        if waiting:
                            typer.echo(waiting, err=True)
                    bar = progress(jobs, "resuming", enabled=show_progress(json_output))
                    advance.append(stack.enter_context(bar))

                return await engine.resume(on_start=started, on_result=lambda _: advance[0]())

    results = run(go())
    if json_output:
        emit_json([r.to_json() for r in results])
    else:
        typer.echo(f"resumed {len(results)} job(s)")
        for result in results:
            typer.echo(f"  {result.job_id}  {result.status}")
    raise typer.Exit(0 if all(r.status.settled for r in results) else EXIT_FAILURE)


# ---------------------------------------------------------------------------------------- reading


def _settlements(store: str | None) -> Any:
    from podsettle.application import Settlements

    with user_errors():
        url = _store(store)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).expanduser().exists():
            fail(f"{_source(store)}: {url} does not exist yet (run a job first, or point --store at a store)")
        return Settlements(url, env=_settings().store_env())


def _job_id(settlements: Any, text: str) -> str:
    """A job id, or a unique prefix of one (as `jobs` shows them): the full id."""
    import re

    candidate = text.strip().lower()
    if len(candidate) == 36 or not re.fullmatch(r"[0-9a-f-]{4,35}", candidate):
        return text  # a full id, or something the store will reject by name
    matches = [str(i) for i in settlements.job_ids() if str(i).startswith(candidate)]
    if len(matches) > 1:
        fail(f"job id {text!r} is the start of {len(matches)} jobs' ids: give more of it")
    if not matches:
        fail(f"job {text!r}: no job id starts with it")
    return matches[0]


def _read_model(store: str | None) -> Any:
    from podsettle.cli.console import read_model

    return read_model(_settlements(store), _store(store), _settings().views)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The job id, or the start of it as `jobs` shows it.")],
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """One job as the log has it."""
    settlements = _settlements(store)
    with user_errors():
        job = settlements.get_job(_job_id(settlements, job_id))
    summary = job.summary()
    if json_output:
        emit_json(summary)
    else:
        from podsettle.cli.console import print_evaluation, print_mapping, print_progress

        progress, evaluation = summary.pop("progress"), summary.pop("evaluation")
        print_mapping(summary, title=f"job {job.id}")
        print_progress(progress)
        print_evaluation(evaluation)


@app.command()
def jobs(
    batch: Annotated[str | None, typer.Option("--batch", help="Only this batch.")] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="Only jobs in this state (e.g. attention).")
    ] = None,
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """List jobs, by batch and state."""
    from podsettle.domain import State

    if state is not None and state.upper() not in State.__members__:
        fail(f"--state: {state!r} is not one of {', '.join(s.lower() for s in State.__members__)}")
    model = _read_model(store)
    rows = model.jobs(state=state.upper() if state else None, batch_id=batch)
    if json_output:
        emit_json([row.to_json() for row in rows])
    else:
        from podsettle.cli.console import print_jobs

        # Short ids must be unique in the whole store, not only among the jobs listed.
        filtered = state is not None or batch is not None
        print_jobs(rows, [row.job_id for row in model.jobs()] if filtered else None)


@app.command()
def totals(
    batch: Annotated[str | None, typer.Option("--batch", help="Only this batch.")] = None,
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Totals: jobs paid, refunded, rejected, in flight; money funded, to workers, fees, returned, held."""
    model = _read_model(store)
    totals = model.batch_totals(batch)
    if json_output:
        emit_json(totals.to_json())
    else:
        from podsettle.cli.console import print_totals

        print_totals(totals, title=f"totals{' of ' + batch if batch else ''}")


@app.command()
def earnings(store: StoreOption = None, json_output: JsonFlag = False) -> None:
    """What each worker earned (released escrows and bonuses)."""
    model = _read_model(store)
    rows = model.earnings()
    if json_output:
        emit_json([row.to_json() for row in rows])
    else:
        from podsettle.cli.console import print_earnings

        print_earnings(rows)


# ---------------------------------------------------------------------------------------- audit


@app.command()
def replay(
    log: Annotated[
        Path | None, typer.Option("--log", help="Audit an exported JSON Lines file instead of the store.")
    ] = None,
    settled: Annotated[
        bool,
        typer.Option("--settled", help="Fail unless every funded job has settled (none in flight)."),
    ] = False,
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Audit the whole history: re-apply every event, check every invariant and the hash chains,
    rebuild the read models and compare. Exit 1 on any violation. A job waiting on a service (its
    compute, a release, a refund the escrow's timeout sweep will make) is reported in flight, not a
    violation, until the bound its log fixes; `--settled` fails on it."""
    from podsettle.adapters.chain import SEALS
    from podsettle.cli.console import audit_report

    with user_errors():
        if log is not None:
            from podsettle.replay import audit_export

            if not log.exists():
                fail(f"--log: {log} does not exist")
            report = audit_export(log, seals=SEALS, settled=settled)
        else:
            from podsettle.cli.console import open_views
            from podsettle.projections import ReadModel
            from podsettle.replay import audit

            settlements = _settlements(store)
            url = _store(store)
            if not settlements.recorder.max_notification_id():
                # An audit of nothing is not a clean bill: most likely the wrong store.
                message = f"the store {url} is empty: there is nothing to audit"
                if json_output:
                    emit_json({"ok": False, "empty": True, "events": 0, "store": url})
                else:
                    typer.echo(message)
                raise typer.Exit(EXIT_FAILURE)
            views = ReadModel(settlements, open_views(settlements, url, _settings().views))
            report = audit(settlements, read_model=views, seals=SEALS, settled=settled)
    if json_output:
        emit_json(report.to_json())
    else:
        typer.echo(audit_report(report))
    raise typer.Exit(0 if report.ok else EXIT_FAILURE)


@app.command()
def migrate(
    source: Annotated[str, typer.Option("--from", help="The store URL to copy the event log from.")],
    target: Annotated[str, typer.Option("--to", help="The store URL to copy it to (holding no events).")],
    json_output: JsonFlag = False,
) -> None:
    """Copy an event log between stores (SQLite and PostgreSQL, either way): audit the source first
    (a tampered one is refused), copy every event in order, compare and audit the copy. Exit 1 when
    the copy does not check out."""
    from podsettle.cli.migrate import migrate as copy_log

    with user_errors():
        result = copy_log(source, target, env=_settings().store_env())
    if json_output:
        emit_json(result.to_json())
    else:
        typer.echo(
            f"copied {result.events} events from {result.source} to {result.target}; "
            f"same events in the same order: {'yes' if result.same_events else 'NO'}; "
            f"audit of the copy: {'OK' if result.target_audit_ok else 'FAILED'}"
        )
        typer.echo(f"log digest: {result.log_digest}")
        for finding in result.findings:
            typer.echo(f"  {finding}")
    raise typer.Exit(0 if result.ok else EXIT_FAILURE)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="The JSON Lines file to write.")],
    store: StoreOption = None,
) -> None:
    """Export every event, hash-chained with checkpoints, for an audit without the database."""
    from podsettle.adapters.chain import SEALS
    from podsettle.replay import export as export_log

    settlements = _settlements(store)
    with user_errors():
        summary = export_log(settlements, out, seals=SEALS)
    data = summary.to_json()
    typer.echo(f"exported {data.get('events')} events to {out}")
    typer.echo(f"running hash: {data.get('running_hash')}  (note it elsewhere: it anchors this export)")


@app.command()
def reconcile(
    resolve: Annotated[str | None, typer.Option("--resolve", help="Resolve this ATTENTION job.")] = None,
    finding: Annotated[
        str | None, typer.Option(help="What the operator found (required with --resolve).")
    ] = None,
    outcome: Annotated[
        str | None,
        typer.Option(help="funded:ESCROW_ID | not-funded | released | refunded | retry (with --resolve)."),
    ] = None,
    operator: Annotated[str | None, typer.Option(help="Who resolves it (default: $USER).")] = None,
    check_escrow: Annotated[
        bool, typer.Option("--check-escrow", help="Also compare with the escrow service.")
    ] = False,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="With --check-escrow: record what the service confirms (a release, a refund by its "
            "timeout sweep) as the engine would.",
        ),
    ] = False,
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """List ATTENTION jobs, jobs waiting on a service (with the bound their log fixes) and, with
    --check-escrow, every difference with the escrow service; or resolve one ATTENTION job with an
    operator's finding. Exit 1 when anything waits for an operator or a wait is past its bound."""
    from podsettle.cli.reconcile import list_attention, resolve_job

    settlements = _settlements(store)
    with user_errors():
        if resolve is not None:
            if not finding or not outcome:
                fail("--resolve needs --finding and --outcome")
            summary = run(
                resolve_job(settlements, resolve, finding, outcome, operator or _settings().operator)
            )
            if json_output:
                emit_json(summary)
            else:
                typer.echo(f"job {resolve}: resolved, now {summary['state']}")
            return
        if apply and not check_escrow:
            fail("--apply needs --check-escrow (it records what the escrow service confirms)")
        listing = run(
            list_attention(settlements, check_escrow=check_escrow, engine_factory=_engine, apply=apply)
        )
    # A difference the service settles is recorded by --apply or the next resume: not an operator's.
    for_operator = [d for d in listing["differences"] if not d["settles"]]
    for_operator += [a for a in listing["applied"] if a["recorded"] is None]
    past_bound = [w for w in listing["waiting"] if w["past_bound"]]
    if json_output:
        emit_json(listing)
    else:
        from podsettle.cli.console import print_attention

        print_attention(listing)
        for applied in listing["applied"]:
            done = f"recorded, now {applied['recorded']}" if applied["recorded"] else applied["error"]
            typer.echo(
                f"applied: job {applied['job_key']} ({applied['job_id']}): {applied['settles']}: {done}"
            )
        for wait in listing["waiting"]:
            late = "PAST ITS BOUND" if wait["past_bound"] else "within its bound"
            job = f"job {wait['job_key']} ({wait['job_id']}) {wait['state']}"
            typer.echo(f"waiting: {job}: its {wait['waiting_for']} until {wait['until']} ({late})")
    raise typer.Exit(EXIT_FAILURE if listing["attention"] or for_operator or past_bound else 0)


@app.command()
def onboard(
    casino_url: Annotated[
        str | None,
        typer.Option(help="Agent registration service (default: $PODSETTLE_CASINO_URL or the hosted one)."),
    ] = None,
    faucet_url: Annotated[
        str | None, typer.Option(help="Faucet service (default: $PODSETTLE_FAUCET_URL or the hosted one).")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Register a new agent and claim the faucet's free USDC; prints the agent id and key once."""
    from podsettle.cli.onboarding import onboard as do_onboard

    settings = _settings()
    result = run(do_onboard(casino_url or settings.casino_url, faucet_url or settings.faucet_url))
    if json_output:
        emit_json(result)
    else:
        typer.echo(f"agent:  {result['agent_id']}")
        typer.echo(f"key:    {result['api_key']}   (shown once: keep it as PF_API_KEY)")
        typer.echo(f"faucet: {result['faucet']}")
    if not result["claimed"]:
        typer.echo(
            "podsettle: error: the faucet refused the claim: the agent above exists and its key works, "
            "but it holds no USDC yet",
            err=True,
        )
        raise typer.Exit(EXIT_FAILURE)


@app.command("mcp")
def mcp_server(
    store: StoreOption = None,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox", help="Run on the embedded sandbox (no keys, no network; $PODSETTLE_SANDBOX)."
        ),
    ] = False,
) -> None:
    """Serve the MCP tools on stdin/stdout, for an MCP client that starts podsettle as a subprocess
    (spending limits: $PODSETTLE_LIMIT_MAX_BUDGET, _DAILY_TOTAL, _ENDPOINTS, _PAYEES)."""
    from podsettle.mcp.stdio import serve_stdio
    from podsettle.settings import Settings

    with user_errors():
        settings = Settings.from_env(store=store, sandbox=True if sandbox else None)
        _store(settings.store)
    run(serve_stdio(settings))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
