"""The composition root: concrete adapters wired into an `Engine`.

`Engine` is the public engine: `EngineCore`'s behaviour plus the three wirings a user picks from
(`from_env`, `sandbox`, `in_process`). Only this module knows the concrete gateways; the engine
core knows their ports. `podsettle.Engine` loads this module on first use, so importing podsettle
stays light, and the adapters and the sandbox are imported inside each wiring.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

from podsettle.application import Settlements
from podsettle.engine import REFUND_BY_DISPUTE_WARNING, EngineCore
from podsettle.processor import ProcessorConfig, local_processor_id
from podsettle.settings import ConfigError, Settings
from podsettle.support.logs import configure_logging, get_logger, hide

log = get_logger("podsettle.bootstrap")

# Connections per service (kept alive by adapters/http.py); a runsync holds one for the length of its
# wait, so there are more than the default 32 jobs in flight.
HTTP_CONNECTIONS = 64
# RunPod jobs are submitted through /runsync with a bounded wait (settings.runpod_runsync_ms, by
# default the contract's minimum of 1000 ms): a job that ends inside it comes back in the same round
# trip (no status polls). An endpoint whose jobs mostly outlast it goes back to /run
# (adapters/runpod.py, SyncPolicy).
DEFAULT_PAYER = "ag_payer"
DEFAULT_PAYEE = "ag_worker"


class Engine(EngineCore):
    """The engine an agent runtime embeds (`from podsettle import Engine`)."""

    @classmethod
    def from_env(cls, settings: Settings | None = None, **overrides: Any) -> Engine:
        """The engine wired to Purple Flea and RunPod from the environment (flags as overrides)."""
        return engine_from_settings(settings or Settings.from_env(**overrides))

    @classmethod
    def sandbox(cls, store: str = "sqlite:///podsettle-sandbox.db", **options: Any) -> Engine:
        """The same engine wired over real loopback HTTP to an in-process sandbox of both services."""
        return sandbox_engine(store, **options)

    @classmethod
    def in_process(cls, store: str = "memory", **options: Any) -> Engine:
        """The engine on in-process gateways (a local ledger and handlers run directly): no HTTP."""
        return in_process_engine(store, **options)


def in_process_engine(
    store: str = "memory",
    *,
    payer: str = DEFAULT_PAYER,
    payee: str = DEFAULT_PAYEE,
    balance: str = "1000000",
    ledger_path: str | None = None,
    endpoints: Mapping[str, Any] | None = None,
    seed: int = 0,
    escrow: Any = None,
    compute: Any = None,
    settings: Settings | None = None,
    processor: ProcessorConfig | None = None,
    **engine_options: Any,
) -> Engine:
    """The engine on the local ledger and in-process RunPod handlers: no network at all.

    Passing `escrow`/`compute` reuses gateways across engines (a restarted engine in the fault
    simulation talks to the same ledger and the same runs).
    """
    from podsettle.adapters.ledger import Ledger
    from podsettle.adapters.ledger_gateway import LedgerEscrow
    from podsettle.sandbox.inprocess_compute import InProcessCompute

    settings = settings or Settings(store=store, payer=payer, payee=payee)
    configure_logging(settings.log_level)
    owned: list[Any] = []
    if escrow is None:
        ledger = Ledger(ledger_path)
        with ledger.transaction() as tx:
            for account in (payer, payee):
                tx.open_account(account)
        if ledger.balance(payer) == 0:
            ledger.mint(payer, balance, key=f"mint:{payer}")
        escrow = LedgerEscrow(ledger, payer=payer)
        owned.append(escrow)
    if compute is None:
        compute = InProcessCompute(endpoints, seed=seed)
        owned.append(compute)
    engine = Engine(
        Settlements(store),
        escrow,
        compute,
        payer=payer,
        settings=settings,
        processor=processor,
        **engine_options,
    )
    for gateway in owned:
        engine.on_close(gateway.aclose)
    return engine


def engine_from_settings(settings: Settings) -> Engine:
    """The production wiring: Purple Flea escrow and RunPod serverless over HTTP."""
    from podsettle.adapters.purpleflea import purple_flea
    from podsettle.adapters.runpod import PollPolicy, RunPodCompute, SyncPolicy

    configure_logging(settings.log_level)
    if settings.pf_api_key is None:
        raise ConfigError("PF_API_KEY: the payer's Purple Flea key is required")
    if settings.runpod_api_key is None:
        raise ConfigError("RUNPOD_API_KEY: a RunPod API key is required")
    if not settings.payer:
        raise ConfigError("PODSETTLE_PAYER: the payer's agent id (ag_...) is required")
    keys = (settings.pf_api_key, settings.pf_worker_key, settings.runpod_api_key)
    hide(*(key.get_secret_value() for key in keys if key is not None))
    if settings.escrow_dialect == "v1" and settings.refund_method == "dispute":
        log.warning("engine.refund_by_dispute", detail=REFUND_BY_DISPUTE_WARNING)
    escrow = purple_flea(
        settings.escrow_url,
        payer_key=settings.pf_api_key.get_secret_value(),
        worker_key=settings.pf_worker_key.get_secret_value() if settings.pf_worker_key else None,
        dialect=settings.escrow_dialect,
        payer_id=settings.payer,
        refund_method=settings.refund_method,
        rate_limits=settings.escrow_rate_limits or None,
        max_connections=HTTP_CONNECTIONS,
    )
    compute = RunPodCompute(
        settings.runpod_api_key.get_secret_value(),
        base_url=settings.runpod_base_url,
        poll=PollPolicy(initial_s=settings.runpod_poll_s, factor=1.5, max_s=max(5.0, settings.runpod_poll_s)),
        max_connections=HTTP_CONNECTIONS,
        sync=SyncPolicy(wait_ms=settings.runpod_runsync_ms) if settings.runpod_runsync_ms else None,
        streaming=settings.runpod_streaming,
    )
    engine = Engine(
        Settlements(settings.store, env=settings.store_env()),
        escrow,
        compute,
        payer=settings.payer,
        settings=settings,
        processor=ProcessorConfig(
            processor_id=local_processor_id(),
            claim_lease_s=settings.claim_lease(max(escrow.longest_call_s, compute.longest_call_s)),
            refund_wait_s=settings.refund_wait_s,
            pending_refund_poll_s=settings.refund_poll_s,
        ),
    )
    engine.on_close(escrow.aclose)
    engine.on_close(compute.aclose)
    return engine


def sandbox_engine(
    store: str = "sqlite:///podsettle-sandbox.db",
    *,
    dialect: str = "v1",
    balance: str = "1000",
    endpoints: Mapping[str, Any] | None = None,
    seed: int = 0,
    concurrency: int = 32,
    job_timeout_s: int = 600,
    sandbox_options: Mapping[str, Any] | None = None,
    processor: ProcessorConfig | None = None,
    streaming: Collection[str] = (),
    escrow: Literal["purpleflea", "ledger"] = "purpleflea",
    payees: Collection[str] = (),
) -> Engine:
    """The engine over real loopback HTTP to a sandbox served in this process: the same adapters as
    production, a funded payer agent and a worker agent created through the admin routes.

    `endpoints` add RunPod endpoints: {name: "path/to/worker.py"} serves a RunPod worker file
    unchanged (or a handler, `"package.module:function"`, an `EndpointConfig`); `streaming` names
    the endpoints whose output is what `/stream` delivered (PODSETTLE_RUNPOD_STREAMING).

    `escrow="ledger"` pays through the local two-phase ledger directly (the sandbox's own ledger,
    the one `GET /sandbox/ledger` reports), not through the escrow API over HTTP: no 0.10 minimum,
    no create rate limit, and partial releases (metered jobs, `price_per_item`); RunPod stays HTTP.
    `payees` names endpoints whose jobs pay a worker agent of their own (one is created for each),
    instead of the one default worker (PODSETTLE_PAYEES).

    Relaxed from the published server for one local engine: its rate limits are lifted and its
    disputes are reviewed at once (`sandbox_options={"escrow_options": {...}}` overrides both)."""
    from podsettle.adapters.ledger_gateway import LedgerEscrow
    from podsettle.adapters.ports import EscrowGateway
    from podsettle.adapters.purpleflea import purple_flea
    from podsettle.adapters.runpod import PollPolicy, RunPodCompute, SyncPolicy
    from podsettle.sandbox.app import Sandbox

    configure_logging()  # WARNING, unless the caller (the command line) configured logging first
    options = dict(sandbox_options or {})
    escrow_options = {"rate_limits": SANDBOX_RATE_LIMITS, "dispute_review": "refund"}
    escrow_options.update(options.pop("escrow_options", {}))
    if escrow not in ("purpleflea", "ledger"):
        raise ConfigError(f"escrow must be 'purpleflea' or 'ledger', got {escrow!r}")
    sandbox = Sandbox(endpoints=endpoints, seed=seed, escrow_options=escrow_options, **options).start()
    try:
        payer = sandbox.create_agent(balance)
        worker = sandbox.create_agent("0")
        own_payees = {name: sandbox.create_agent("0").agent_id for name in payees}
        gateway: EscrowGateway
        if escrow == "ledger":
            gateway = LedgerEscrow(sandbox.app.escrow.state.escrow.ledger, payer=payer.agent_id)
        else:
            gateway = purple_flea(
                sandbox.url,
                payer_key=payer.api_key,
                worker_key=worker.api_key,
                dialect=dialect,  # type: ignore[arg-type]
                payer_id=payer.agent_id,
                # This sandbox reviews a dispute at once (dispute_review above), so a dispute is its
                # quickest refund; the published service never resolves one (Settings.refund_method).
                refund_method="dispute",
                rate_limits=SANDBOX_RATE_LIMITS,
            )
        compute = RunPodCompute(
            "sandbox-key",
            base_url=sandbox.runpod_url,
            seed=seed,
            poll=PollPolicy(initial_s=0.05, factor=1.5),
            sync=SyncPolicy(),  # runsync with the contract's minimum wait, as production by default
            streaming=streaming,
        )
    except BaseException:
        sandbox.stop()
        raise
    settings = Settings(
        store=store,
        payer=payer.agent_id,
        payee=worker.agent_id,
        payees=own_payees,
        escrow_url=sandbox.url,
        escrow_dialect=dialect,  # type: ignore[arg-type]
        refund_method="dispute",
        runpod_base_url=sandbox.runpod_url,
        runpod_streaming=frozenset(streaming),
        concurrency=concurrency,
        job_timeout_s=job_timeout_s,
    )
    engine = Engine(
        Settlements(store),
        gateway,
        compute,
        payer=payer.agent_id,
        settings=settings,
        # The sandbox reviews disputes at once: wait for those refunds rather than report them pending.
        processor=processor or ProcessorConfig(pending_refund_poll_s=0.05, refund_wait_s=30.0),
    )
    engine.sandbox_server = sandbox
    engine.on_close(sandbox.stop)
    engine.on_close(compute.aclose)
    engine.on_close(gateway.aclose)
    return engine


# The sandbox serves one local engine: its rate limits are far above the hosted service's, and the
# adapter's client-side limiter is told the same.
SANDBOX_RATE_LIMITS = {
    "create": 100_000,
    "complete": 100_000,
    "release": 100_000,
    "dispute": 100_000,
    "cancel": 100_000,
}
