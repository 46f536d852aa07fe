"""The `podsettle` command line.

Start-up stays quick: each command imports what it needs when it runs. A user error (a bad flag,
amount, JSON line or configuration, an unreachable service, a missing key) prints one line naming
what is wrong and exits 2 (usage or configuration) or 1 (failure), without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine, Iterator
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
    from podsettle.adapters.persistence import store_from_url

    url = store or _settings().store
    store_from_url(url, _source(store))  # validates, with a message naming where the URL came from
    return url


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
) -> None:
    """Serve the RunPod-compatible and Purple Flea-compatible sandbox APIs on one port."""
    with user_errors():
        import uvicorn

        from podsettle.sandbox.app import SandboxApp

        mounted = _endpoint_options(endpoint or [])
        try:
            sandbox_app = SandboxApp(ledger_path=ledger, endpoints=mounted)
        except ValueError as error:  # a worker file that cannot be mounted, a bad endpoint name
            fail(str(error))
        base = f"http://{host}:{port}"
        for name, path in mounted.items():
            typer.echo(f"Endpoint {name}: {path}  ->  {base}/v2/{name}/run")
        typer.echo(f"RunPod serverless API:  {base}/v2   (RUNPOD_ENDPOINT_BASE_URL; any non-empty key)")
        typer.echo(f"Purple Flea escrow API: {base}       (PODSETTLE_ESCROW_URL; dialects v1 and seed)")
        typer.echo(f'Admin: POST {base}/sandbox/agents {{"balance": "100.00"}} ; GET {base}/sandbox/ledger')
        sys.stdout.flush()
        uvicorn.run(sandbox_app, host=host, port=port, log_level="warning", lifespan="off")


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

    async def go() -> Any:
        async with _engine(store=_store(store)) as engine:
            await engine.check_services(endpoint)
            return await engine.run_paid_job(
                endpoint, job_input, budget, payee=payee, referral=referral, job_key=key
            )

    result = run(go())
    if json_output:
        emit_json(result.to_json())
    else:
        from podsettle.cli.console import print_job

        print_job(result)
    _explain_refunds([result])
    raise typer.Exit(0 if result.paid else EXIT_FAILURE)


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text")
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        jobs.append(_parse_json_object(line, f"{path} line {number}"))
    if not jobs:
        fail(f"{path}: holds no jobs (one JSON object per line)")
    return jobs


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
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Run a batch of jobs and settle each; prints the totals. Exit 1 when any job was not paid.

    Refunds on the published Purple Flea service come back through its timeout sweep: after each
    escrow's timeout (the job's deadline plus an hour, in whole hours) and up to 5 minutes more, less
    the 1% commission, which the service keeps."""
    from podsettle.domain.money import to_money

    jobs = _read_jsonl(file)
    with user_errors():
        to_money(budget, "--budget", allow_zero=False)

    async def go() -> Any:
        from podsettle.cli.console import progress

        async with _engine(store=_store(store)) as engine:
            await engine.check_services(endpoint)
            with progress(len(jobs), "settling", enabled=show_progress(json_output)) as advance:
                return await engine.run_batch(
                    endpoint,
                    jobs,
                    budget,
                    payee=payee,
                    concurrency=concurrency,
                    batch_id=batch_id,
                    on_result=lambda _: advance(),
                )

    result = run(go())
    if json_output:
        emit_json(result.to_json())
    else:
        from podsettle.cli.console import print_totals

        print_totals(result.totals, title=f"batch {result.batch_id}")
    _explain_refunds(result.results)
    raise typer.Exit(0 if result.totals.paid_jobs == result.totals.jobs else EXIT_FAILURE)


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

    async def go() -> Any:
        async with _engine(store=_store(store)) as engine:
            return await engine.award_bonus(job_id, baseline, achieved, pool, threshold=threshold)

    result = run(go())
    if json_output:
        emit_json(result.to_json())
    else:
        typer.echo(f"bonus {result.bonus_gross:f} USDC ({result.reason}): {result.status}")
    raise typer.Exit(0 if result.status in ("awarded", "none") else EXIT_FAILURE)


@app.command()
def resume(store: StoreOption = None, json_output: JsonFlag = False) -> None:
    """Finish every job an engine left unfinished (after a crash or a stop)."""

    async def go() -> Any:
        async with _engine(store=_store(store)) as engine:
            return await engine.resume()

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


def _read_model(store: str | None) -> Any:
    from podsettle.cli.console import read_model

    return read_model(_settlements(store), _store(store), _settings().views)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The job id (a UUID).")],
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """One job as the log has it."""
    settlements = _settlements(store)
    with user_errors():
        job = settlements.get_job(job_id)
    summary = job.summary()
    if json_output:
        emit_json(summary)
    else:
        from podsettle.cli.console import print_mapping, print_progress

        progress = summary.pop("progress")
        print_mapping(summary, title=f"job {job.id}")
        print_progress(progress)


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

        print_jobs(rows)


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
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Audit the whole history: re-apply every event, check every invariant and the hash chains,
    rebuild the read models and compare. Exit 1 on any violation."""
    from podsettle.adapters.chain import SEALS
    from podsettle.cli.console import audit_report

    with user_errors():
        if log is not None:
            from podsettle.replay import audit_export

            if not log.exists():
                fail(f"--log: {log} does not exist")
            report = audit_export(log, seals=SEALS)
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
            report = audit(settlements, read_model=views, seals=SEALS)
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
    store: StoreOption = None,
    json_output: JsonFlag = False,
) -> None:
    """List ATTENTION jobs (and, with --check-escrow, every difference with the escrow service), or
    resolve one with an operator's finding."""
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
        listing = run(list_attention(settlements, check_escrow=check_escrow, engine_factory=_engine))
    if json_output:
        emit_json(listing)
    else:
        from podsettle.cli.console import print_attention

        print_attention(listing)
    raise typer.Exit(0 if not listing["attention"] and not listing["differences"] else EXIT_FAILURE)


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
