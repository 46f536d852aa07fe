"""Helpers for tests that run the escrow sandbox over real HTTP on a loopback port."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from podsettle.adapters.purpleflea import PurpleFleaEscrow, purple_flea
from podsettle.sandbox.escrow_server import create_escrow_app
from podsettle.sandbox.http_server import BackgroundServer

# Loose limits: the contract tests make many calls from one IP; the rate-limit tests set their own.
LOOSE_LIMITS = {"create": 10_000, "complete": 10_000, "release": 10_000, "dispute": 10_000, "cancel": 10_000}


class Sandbox:
    def __init__(self, server: BackgroundServer, app: Any) -> None:
        self.server = server
        self.app = app
        self.url = server.url
        self.http = httpx.Client(base_url=server.url, timeout=10.0)
        self.codes: dict[str, str] = {}  # each agent's own referral code, as the admin route made it

    def agent(self, balance: str = "100.00", referrer: str | None = None) -> tuple[str, str]:
        body: dict[str, Any] = {"balance": balance}
        if referrer:
            body["referrer"] = referrer
        response = self.http.post("/sandbox/agents", json=body)
        assert response.status_code == 201, response.text
        data = response.json()
        self.codes[data["agent_id"]] = data["referral_code"]
        return data["agent_id"], data["api_key"]

    def ledger(self) -> dict[str, Any]:
        response = self.http.get("/sandbox/ledger")
        assert response.status_code == 200
        data: dict[str, Any] = response.json()
        return data

    def balance(self, agent_id: str) -> str:
        for account in self.ledger()["accounts"]:
            if account["account"] == agent_id:
                return str(account["balance"])
        raise AssertionError(f"no account {agent_id}")

    def fault(self, route: str, mode: str, count: int = 1, **extra: Any) -> None:
        response = self.http.post(
            "/sandbox/faults", json={"route": route, "mode": mode, "count": count, **extra}
        )
        assert response.status_code == 200, response.text

    def adapter(self, payer_key: str, **kwargs: Any) -> PurpleFleaEscrow:
        kwargs.setdefault("rate_limits", LOOSE_LIMITS)
        return purple_flea(self.url, payer_key=payer_key, **kwargs)


@contextmanager
def running_sandbox(**options: Any) -> Iterator[Sandbox]:
    options.setdefault("rate_limits", LOOSE_LIMITS)
    options.setdefault("sweep_interval_s", math.inf)
    app = create_escrow_app(**options)
    with BackgroundServer(app) as server:
        sandbox = Sandbox(server, app)
        try:
            yield sandbox
        finally:
            sandbox.http.close()
            app.state.escrow.ledger.close()
