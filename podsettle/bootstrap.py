"""The composition root: concrete adapters wired into an `Engine`.

Imported lazily by `Engine.from_env`, `Engine.sandbox` and `Engine.in_process`, so that importing
podsettle stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from podsettle.adapters.processors import ProcessorConfig
from podsettle.application import Settlements
from podsettle.engine import Engine
from podsettle.logs import configure_logging, get_logger
from podsettle.settings import ConfigError, Settings

log = get_logger("podsettle.bootstrap")
DEFAULT_PAYER = "ag_payer"
DEFAULT_PAYEE = "ag_worker"


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
    from podsettle.adapters.inprocess_compute import InProcessCompute
    from podsettle.adapters.ledger import Ledger
    from podsettle.adapters.ledger_gateway import LedgerEscrow

    configure_logging()
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
    settings = settings or Settings(store=store, payer=payer, payee=payee)
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
    from podsettle.adapters.purpleflea import PurpleFleaEscrow
    from podsettle.adapters.runpod import RunPodCompute

    configure_logging()
    if settings.pf_api_key is None:
        raise ConfigError("PF_API_KEY: the payer's Purple Flea key is required")
    if settings.runpod_api_key is None:
        raise ConfigError("RUNPOD_API_KEY: a RunPod API key is required")
    if not settings.payer:
        raise ConfigError("PODSETTLE_PAYER: the payer's agent id (ag_...) is required")
    escrow = PurpleFleaEscrow(
        settings.escrow_url,
        api_key=settings.pf_api_key.get_secret_value(),
        worker_key=settings.pf_worker_key.get_secret_value() if settings.pf_worker_key else None,
        dialect=settings.escrow_dialect,
        refund_method=settings.refund_method,
    )
    compute = RunPodCompute(settings.runpod_base_url, api_key=settings.runpod_api_key.get_secret_value())
    engine = Engine(Settlements(settings.store), escrow, compute, payer=settings.payer, settings=settings)
    engine.on_close(escrow.aclose)
    engine.on_close(compute.aclose)
    return engine
