"""The escrow sandbox by default behaves as the published server (contracts/purpleflea-escrow.md):
its rate limiter, its timeout sweep's timetable and referral share, its content type, and its
permanent disputes; and `podsettle sandbox` serves it with those defaults."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from podsettle.domain.rules import commission, referral_fee
from podsettle.sandbox.app import SandboxApp
from podsettle.sandbox.escrow_server import (
    DEFAULT_RATE_LIMITS,
    SWEEP_INTERVAL_S,
    EscrowSandbox,
    create_escrow_app,
)
from podsettle.sandbox.http_server import BackgroundServer

START = datetime(2026, 11, 28, 0, 0, tzinfo=UTC)
DESCRIPTION = "RunPod job 7f3a (render tile 12)"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class Box:
    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.state: EscrowSandbox = app.state.escrow
        self.http = httpx.Client(base_url=url, timeout=10.0)

    def agent(self, balance: str = "100.00", referrer: str | None = None) -> tuple[str, str]:
        body: dict[str, Any] = {"balance": balance}
        if referrer is not None:
            body["referrer"] = referrer
        data = self.http.post("/sandbox/agents", json=body).json()
        return data["agent_id"], data["api_key"]

    def create(
        self, key: str, worker: str, amount: Any = 1, hours: int = 1, **headers: str
    ) -> httpx.Response:
        return self.http.post(
            "/escrow/create",
            json={
                "amount_usd": amount,
                "description": DESCRIPTION,
                "counterparty_agent_id": worker,
                "timeout_hours": hours,
            },
            headers={"Authorization": f"Bearer {key}", **headers},
        )

    def status(self, escrow_id: str) -> str:
        return str(self.http.get(f"/escrow/{escrow_id}").json()["status"])

    def balance(self, agent_id: str) -> Decimal:
        for account in self.http.get("/sandbox/ledger").json()["accounts"]:
            if account["account"] == agent_id:
                return Decimal(account["balance"])
        raise AssertionError(agent_id)

    def advance(self, seconds: float) -> None:
        assert self.http.post("/sandbox/clock", json={"advance_s": seconds}).status_code == 200


@contextmanager
def published(**options: Any) -> Iterator[Box]:
    """The sandbox with its defaults (the published server's behaviour) on a clock of the test's."""
    app = create_escrow_app(**options)
    with BackgroundServer(app) as server:
        box = Box(app, server.url)
        try:
            yield box
        finally:
            box.http.close()
            box.state.ledger.close()


# ---------------------------------------------------------------------------------------- limits


def test_create_limit_is_one_fixed_window_shared_by_every_client_without_proxy_headers() -> None:
    with published(clock=Clock()) as box:
        _, key = box.agent()
        worker, _ = box.agent("0")
        answers = [box.create(key, worker, 0.1, 1).status_code for _ in range(20)]
        assert answers == [201] * 20
        # Another client on another connection, no proxy header: the same "unknown" bucket.
        with httpx.Client(base_url=str(box.http.base_url)) as other:
            refused = other.post(
                "/escrow/create",
                json={"amount_usd": 0.1, "description": DESCRIPTION, "counterparty_agent_id": worker},
                headers={"Authorization": f"Bearer {key}"},
            )
        assert refused.status_code == 429
        assert refused.json()["error"] == "rate_limited"
        assert refused.json()["message"] == "Too many requests. Limit: 20 per 60s"
        assert refused.json()["_info"]["service"] == "agent-escrow"
        assert not {"retry-after", "x-ratelimit-limit", "ratelimit-limit"} & set(refused.headers)
        # A forwarded IP has its own bucket (the first entry of X-Forwarded-For, else X-Real-IP).
        forwarded = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
        assert box.create(key, worker, 0.1, 1, **forwarded).status_code == 201
        assert box.create(key, worker, 0.1, 1, **{"X-Real-IP": "203.0.113.8"}).status_code == 201
        # The window is fixed: it ends 60 s after its first call, not 60 s after each call.
        box.advance(60)
        assert box.create(key, worker, 0.1, 1).status_code == 429  # exactly 60 s: still the window
        box.advance(0.5)
        assert box.create(key, worker, 0.1, 1).status_code == 201


def test_an_unauthorized_create_uses_a_slot_of_the_limit() -> None:
    with published(clock=Clock()) as box:
        _, key = box.agent()
        worker, _ = box.agent("0")
        unauthorized = [box.create("pf_live_wrong", worker).status_code for _ in range(20)]
        assert unauthorized == [401] * 20
        assert box.create(key, worker).status_code == 429
        assert box.state.ledger.conservation().held == 0


def test_release_complete_and_dispute_are_counted_per_escrow_id() -> None:
    with published(clock=Clock()) as box:
        _, key = box.agent()
        worker, worker_key = box.agent("0")
        first = box.create(key, worker).json()["escrow_id"]
        second = box.create(key, worker).json()["escrow_id"]
        auth = {"Authorization": f"Bearer {worker_key}"}  # the worker may not release: 403s
        releases = {box.http.post(f"/escrow/release/{first}", headers=auth).status_code for _ in range(30)}
        assert releases == {403}
        assert box.http.post(f"/escrow/release/{first}", headers=auth).status_code == 429
        assert box.http.post(f"/escrow/release/{second}", headers=auth).status_code == 403
        for _ in range(10):
            box.http.post(f"/escrow/dispute/{first}", headers={"Authorization": "Bearer nope"})
        refused = box.http.post(f"/escrow/dispute/{first}", headers=auth)
        assert refused.status_code == 429
        assert refused.json()["message"] == "Too many requests. Limit: 10 per 60s"
        assert box.http.post(f"/escrow/complete/{second}", headers=auth).status_code == 200
        assert box.http.post(f"/escrow/dispute/{second}", headers=auth).status_code == 200


def test_the_limits_can_be_lifted() -> None:
    lifted = dict.fromkeys(("create", "complete", "release", "dispute", "cancel"), 1000)
    with published(clock=Clock(), rate_limits=lifted) as box:
        _, key = box.agent()
        worker, _ = box.agent("0")
        assert {box.create(key, worker, 0.1).status_code for _ in range(25)} == {201}


# ---------------------------------------------------------------------------------------- sweep


def test_the_sweep_runs_on_the_services_five_minute_timetable() -> None:
    with published(clock=Clock()) as box:
        _, key = box.agent()
        worker, _ = box.agent("0")
        box.advance(10)  # created 10 s after startup: due 10 s after the 12th tick of the timer
        escrow_id = box.create(key, worker).json()["escrow_id"]
        box.advance(3600 + 60)
        # Past its auto_release_at, but the timer's last tick came before it was due: still funded.
        assert box.status(escrow_id) == "funded"
        box.advance(SWEEP_INTERVAL_S - 60)
        assert box.status(escrow_id) == "refunded"


def test_the_sweep_runs_at_startup(tmp_path: Path) -> None:
    path = str(tmp_path / "escrow.db")
    clock = Clock()
    with published(ledger_path=path, clock=clock) as first:
        payer, key = first.agent()
        worker, _ = first.agent("0")
        escrow_id = first.create(key, worker).json()["escrow_id"]
    clock.now += timedelta(hours=2)
    sandbox = EscrowSandbox(ledger_path=path, clock=clock)
    try:
        with sandbox.ledger.transaction() as tx:
            row = tx.execute(
                "SELECT status FROM sandbox_escrows WHERE escrow_id = ?", (escrow_id,)
            ).fetchone()
        assert row[0] == "refunded"  # before any request came
        assert sandbox.ledger.balance(payer) == Decimal("99.99")
    finally:
        sandbox.ledger.close()


def test_a_timeout_refund_pays_the_referrer_its_share() -> None:
    with published(clock=Clock()) as box:
        referrer, _ = box.agent("0")
        payer, key = box.agent("10.00", referrer=referrer)
        worker, _ = box.agent("0")
        escrow_id = box.create(key, worker, 2.5).json()["escrow_id"]
        box.advance(2 * 3600)
        assert box.status(escrow_id) == "refunded"
        fee = commission(Decimal("2.50"))
        assert box.balance(payer) == Decimal("10.00") - fee
        assert box.balance(referrer) == referral_fee(fee) > 0
        assert box.balance(worker) == 0
        assert box.http.get("/sandbox/ledger").json()["conserved"] is True


def test_a_dispute_is_permanent_the_sweep_skips_it() -> None:
    with published(clock=Clock()) as box:
        payer, key = box.agent("5.00")
        worker, _ = box.agent("0")
        escrow_id = box.create(key, worker).json()["escrow_id"]
        auth = {"Authorization": f"Bearer {key}"}
        disputed = box.http.post(f"/escrow/dispute/{escrow_id}", json={"reason": "failed"}, headers=auth)
        assert disputed.json()["status"] == "disputed"
        box.advance(30 * 24 * 3600)
        assert box.http.post("/sandbox/sweep").json() == {"refunded": []}
        assert box.status(escrow_id) == "disputed"
        assert box.balance(payer) == Decimal("4.00")
        assert box.http.post(f"/escrow/release/{escrow_id}", headers=auth).status_code == 409


# ---------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("GET", "/escrow/stats"),
        ("GET", "/escrow/esc_0000000000000000"),
        ("GET", "/nope"),
        ("POST", "/escrow/create"),
        ("GET", "/sandbox/ledger"),
    ],
)
def test_json_answers_carry_the_services_content_type(method: str, path: str) -> None:
    with published() as box:
        response = box.http.request(method, path)
        assert response.headers["content-type"] == "application/json; charset=UTF-8"


def test_podsettle_sandbox_serves_the_published_behaviour_by_default() -> None:
    app = SandboxApp()
    state: EscrowSandbox = app.escrow.state.escrow
    try:
        assert state.rate_limits == DEFAULT_RATE_LIMITS
        assert (state.rate_limits["create"], state.rate_limit_window_s) == (20, 60.0)
        assert state.sweep_interval_s == SWEEP_INTERVAL_S == 300
        assert state.dispute_review is None
    finally:
        state.ledger.close()
