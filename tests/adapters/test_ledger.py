"""The local two-phase ledger: unit tests, a hypothesis state machine against a model, concurrency.

After every step of the state machine the ledger conserves money (balances + open holds == minted),
every balance and hold equals the model's, and a repeated key answered the same or was refused.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, rule

from podsettle.adapters.ledger import (
    FEES_ACCOUNT,
    HoldExpired,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidPosting,
    Ledger,
    LedgerError,
    UnknownAccount,
    UnknownHold,
)
from podsettle.domain.errors import InvalidAmount
from podsettle.domain.money import ZERO, Money, quantize, to_money
from podsettle.domain.rules import commission, referral_fee

START = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def M(text: str) -> Money:
    return to_money(text)


@pytest.fixture
def ledger() -> Ledger:
    book = Ledger(clock=FakeClock())
    for account in ("payer", "payee", "referrer"):
        book.open_account(account)
    book.mint("payer", "10.00", key="mint-payer")
    return book


# ---------------------------------------------------------------------------------------- unit


def test_hold_and_full_post_with_referral(ledger: Ledger) -> None:
    hold = ledger.hold(key="h1", payer="payer", amount="2.00", meta={"job": "7f3a"})
    assert (hold.status, hold.amount, hold.meta) == ("held", M("2"), {"job": "7f3a"})
    assert ledger.balance("payer") == M("8")
    posting = ledger.post(
        hold.hold_id,
        key="p1",
        payee="payee",
        net="1.98",
        fee="0.02",
        referrer="referrer",
        referral_fee="0.003",
    )
    assert (posting.net, posting.fee, posting.referral_fee, posting.returned) == (
        M("1.98"),
        M("0.02"),
        M("0.003"),
        ZERO,
    )
    assert ledger.balance("payee") == M("1.98")
    assert ledger.balance(FEES_ACCOUNT) == M("0.017")
    assert ledger.balance("referrer") == M("0.003")
    assert ledger.get_hold(hold.hold_id).status == "posted"
    assert ledger.settlement(hold.hold_id) == posting
    assert ledger.conservation().conserved


def test_partial_post_returns_the_remainder(ledger: Ledger) -> None:
    hold = ledger.hold(key="h1", payer="payer", amount="2.00")
    posting = ledger.post(hold.hold_id, key="p1", payee="payee", net="0.99", fee="0.01")
    assert posting.returned == M("1.00")
    assert ledger.balance("payer") == M("9.00")
    report = ledger.conservation()
    assert report.conserved and report.held == ZERO and report.minted == M("10")


def test_void_gives_everything_back(ledger: Ledger) -> None:
    hold = ledger.hold(key="h1", payer="payer", amount="3.5")
    assert ledger.conservation().held == M("3.5")
    posting = ledger.void(hold.hold_id, key="v1")
    assert (posting.status, posting.returned, posting.fee) == ("voided", M("3.5"), ZERO)
    assert ledger.balance("payer") == M("10")
    with pytest.raises(HoldNotOpen, match="voided"):
        ledger.post(hold.hold_id, key="p1", payee="payee", net="1", fee="0")
    with pytest.raises(HoldNotOpen):
        ledger.void(hold.hold_id, key="v2")
    assert ledger.void(hold.hold_id, key="v1") == posting  # the same key: the same answer


def test_a_repeated_key_matches_what_an_older_ledger_wrote_in_ascii_escapes(ledger: Ledger) -> None:
    meta = {"description": "entraînement é", "payee": "payee"}
    first = ledger.hold(key="h-ascii", payer="payer", amount="1.00", meta=meta)
    # Rows written before the params were written with orjson spell non-ASCII text as \u escapes.
    with ledger.transaction() as tx:
        (params,) = tx.execute("SELECT params FROM ledger_operations WHERE key = 'h-ascii'").fetchone()
        tx.execute(
            "UPDATE ledger_operations SET params = ? WHERE key = 'h-ascii'",
            (json.dumps(json.loads(params), sort_keys=True, separators=(",", ":")),),
        )
    assert ledger.hold(key="h-ascii", payer="payer", amount="1.00", meta=meta) == first
    assert ledger.balance("payer") == M("9")
    with pytest.raises(IdempotencyConflict, match="h-ascii"):
        ledger.hold(key="h-ascii", payer="payer", amount="1.00", meta={**meta, "description": "autre"})


def test_same_key_same_answer_other_parameters_refused(ledger: Ledger) -> None:
    first = ledger.hold(key="h1", payer="payer", amount="1.00")
    assert ledger.hold(key="h1", payer="payer", amount="1.00") == first
    assert ledger.balance("payer") == M("9")
    with pytest.raises(IdempotencyConflict, match="h1"):
        ledger.hold(key="h1", payer="payer", amount="1.01")
    with pytest.raises(IdempotencyConflict, match="hold"):
        ledger.void(first.hold_id, key="h1")
    posting = ledger.post(first.hold_id, key="p1", payee="payee", net="0.99", fee="0.01")
    assert ledger.post(first.hold_id, key="p1", payee="payee", net="0.99", fee="0.01") == posting
    with pytest.raises(IdempotencyConflict):
        ledger.post(first.hold_id, key="p1", payee="payee", net="0.98", fee="0.02")
    assert ledger.mint("payee", "1", key="m") == ledger.mint("payee", "1", key="m")
    assert ledger.balance("payee") == M("1.99")
    assert ledger.find_hold("h1") == ledger.get_hold(first.hold_id)
    assert ledger.find_hold("nope") is None


def test_refusals_name_what_is_wrong_and_change_nothing(ledger: Ledger) -> None:
    with pytest.raises(InsufficientFunds, match="payer"):
        ledger.hold(key="h1", payer="payer", amount="10.000001")
    with pytest.raises(UnknownAccount, match="ghost"):
        ledger.hold(key="h1", payer="ghost", amount="1")
    with pytest.raises(InvalidAmount, match="amount"):
        ledger.hold(key="h1", payer="payer", amount=1.5)
    with pytest.raises(InvalidAmount, match="amount"):
        ledger.hold(key="h1", payer="payer", amount="0")
    hold = ledger.hold(key="h1", payer="payer", amount="1")
    with pytest.raises(InvalidPosting, match="net"):
        ledger.post(hold.hold_id, key="p", payee="payee", net="0.99", fee="0.02")
    with pytest.raises(InvalidPosting, match="net"):
        ledger.post(hold.hold_id, key="p", payee="payee", net="0", fee="0")
    with pytest.raises(InvalidPosting, match="referral_fee"):
        ledger.post(hold.hold_id, key="p", payee="payee", net="0.99", fee="0.01", referral_fee="0.02")
    with pytest.raises(InvalidPosting, match="referrer"):
        ledger.post(hold.hold_id, key="p", payee="payee", net="0.99", fee="0.01", referral_fee="0.001")
    with pytest.raises(InvalidAmount, match="fee"):
        ledger.post(hold.hold_id, key="p", payee="payee", net="0.99", fee="-0.01")
    with pytest.raises(UnknownAccount, match="ghost"):
        ledger.post(hold.hold_id, key="p", payee="ghost", net="0.99", fee="0.01")
    with pytest.raises(UnknownHold):
        ledger.void("hold_missing", key="v")
    with pytest.raises(InvalidPosting, match="key"):
        ledger.void(hold.hold_id, key="")
    assert ledger.get_hold(hold.hold_id).status == "held"
    assert ledger.balance("payer") == M("9")
    assert ledger.conservation().conserved


def test_expiry(ledger: Ledger) -> None:
    clock: FakeClock = ledger._clock  # type: ignore[assignment]
    soon = ledger.hold(key="h1", payer="payer", amount="1", expires_at=START + timedelta(hours=1))
    later = ledger.hold(key="h2", payer="payer", amount="2", expires_at=START + timedelta(hours=5))
    assert ledger.expire_holds() == []
    clock.now = START + timedelta(hours=2)
    with pytest.raises(HoldExpired):
        ledger.post(soon.hold_id, key="p", payee="payee", net="0.99", fee="0.01")
    expired = ledger.expire_holds()
    assert [(p.hold_id, p.status, p.returned) for p in expired] == [(soon.hold_id, "expired", M("1"))]
    assert ledger.get_hold(soon.hold_id).status == "expired"
    assert ledger.get_hold(later.hold_id).status == "held"
    assert ledger.balance("payer") == M("8")
    assert ledger.settlement(soon.hold_id) == expired[0]
    assert ledger.settlement(later.hold_id) is None
    assert ledger.conservation().conserved


def test_transfer_and_unknown_accounts(ledger: Ledger) -> None:
    assert ledger.transfer("payer", "payee", "1.5", key="t") == M("1.5")
    assert ledger.transfer("payer", "payee", "1.5", key="t") == M("1.5")
    assert ledger.balance("payee") == M("1.5")
    with pytest.raises(InsufficientFunds):
        ledger.transfer("payee", "payer", "2", key="t2")
    with pytest.raises(UnknownAccount):
        ledger.balance("ghost")
    with pytest.raises(UnknownAccount):
        ledger.mint("ghost", "1", key="m")


def test_state_survives_reopening_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    first = Ledger(path)
    first.open_account("a")
    first.mint("a", "5", key="m")
    hold = first.hold(key="h", payer="a", amount="2")
    first.close()
    second = Ledger(path)
    assert second.balance("a") == M("3")
    assert second.find_hold("h") == hold
    assert second.hold(key="h", payer="a", amount="2") == hold
    assert second.conservation().conserved
    second.close()


# ---------------------------------------------------------------------------------------- model


@dataclass
class ModelHold:
    payer: str
    amount: Money
    expires_at: datetime | None
    status: str = "held"


@dataclass
class Model:
    balances: dict[str, Money] = field(default_factory=dict)
    holds: dict[str, ModelHold] = field(default_factory=dict)
    # key -> (kind, parameters, the answer)
    operations: dict[str, tuple[str, tuple[Any, ...], Any]] = field(default_factory=dict)
    minted: Money = ZERO

    def add(self, account: str, amount: Decimal) -> None:
        self.balances[account] = Money(self.balances[account] + amount)


KEYS = st.sampled_from([f"k{i}" for i in range(6)])
PAYERS = st.sampled_from(["alice", "bob"])
AMOUNTS = st.sampled_from(["0.10", "0.50", "1", "2.345678", "7", "0.000001"])
PORTIONS = st.sampled_from(["full", "half", "tiny", "over", "zero"])


class LedgerMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    @initialize()
    def start(self) -> None:
        self.clock = FakeClock()
        self.ledger = Ledger(clock=self.clock)
        self.model = Model()
        for account in ("alice", "bob", "worker", "referrer", FEES_ACCOUNT):
            self.ledger.open_account(account)
            self.model.balances[account] = ZERO
        for account, amount in (("alice", "10"), ("bob", "3")):
            self.ledger.mint(account, amount, key=f"seed-{account}")
            self.model.add(account, M(amount))
            self.model.minted = Money(self.model.minted + M(amount))
        self.model.operations["seed-alice"] = ("mint", ("alice", M("10")), M("10"))
        self.model.operations["seed-bob"] = ("mint", ("bob", M("3")), M("3"))

    def _repeat(self, key: str, kind: str, params: tuple[Any, ...], call: Any) -> tuple[bool, Any]:
        """A key used before: the same operation answers the same, any other is refused."""
        if key not in self.model.operations:
            return False, None
        known_kind, known_params, answer = self.model.operations[key]
        if (known_kind, known_params) == (kind, params):
            assert call() == answer
        else:
            with pytest.raises(IdempotencyConflict):
                call()
        return True, None

    @rule(key=KEYS, account=PAYERS, amount=AMOUNTS)
    def mint(self, key: str, account: str, amount: str) -> None:
        value = M(amount)
        repeated, _ = self._repeat(
            key, "mint", (account, value), lambda: self.ledger.mint(account, value, key=key)
        )
        if repeated:
            return
        assert self.ledger.mint(account, value, key=key) == value
        self.model.add(account, value)
        self.model.minted = Money(self.model.minted + value)
        self.model.operations[key] = ("mint", (account, value), value)

    @rule(target=holds, key=KEYS, payer=PAYERS, amount=AMOUNTS, expires_h=st.sampled_from([None, 1, 3]))
    def hold(self, key: str, payer: str, amount: str, expires_h: int | None) -> Any:
        value = M(amount)
        expires = None if expires_h is None else self.clock.now + timedelta(hours=expires_h)
        params = (payer, value, expires)

        def call() -> Any:
            return self.ledger.hold(key=key, payer=payer, amount=value, expires_at=expires)

        repeated, _ = self._repeat(key, "hold", params, call)
        if repeated:
            return multiple()
        if self.model.balances[payer] < value:
            with pytest.raises(InsufficientFunds):
                call()
            return multiple()
        created = call()
        assert (created.payer, created.amount, created.status) == (payer, value, "held")
        self.model.add(payer, -value)
        self.model.holds[created.hold_id] = ModelHold(payer, value, expires)
        self.model.operations[key] = ("hold", params, created)
        return created.hold_id

    @rule(hold_id=holds, key=KEYS, portion=PORTIONS, referred=st.booleans())
    def post(self, hold_id: str, key: str, portion: str, referred: bool) -> None:
        held = self.model.holds[hold_id]
        total = {
            "full": held.amount,
            "half": quantize(held.amount / 2),
            "tiny": M("0.000001"),
            "over": Money(held.amount + M("0.000001")),
            "zero": ZERO,
        }[portion]
        fee = commission(total)
        net = Money(total - fee)
        share = referral_fee(fee) if referred else ZERO
        referrer = "referrer" if referred else None
        params = (hold_id, net, fee, referrer, share)

        def call() -> Any:
            return self.ledger.post(
                hold_id, key=key, payee="worker", net=net, fee=fee, referrer=referrer, referral_fee=share
            )

        repeated, _ = self._repeat(key, "post", params, call)
        if repeated:
            return
        expired = held.expires_at is not None and held.expires_at <= self.clock.now
        if held.status != "held" or expired:
            with pytest.raises(HoldExpired if held.status == "held" else HoldNotOpen):
                call()
            return
        if total == 0 or total > held.amount:
            with pytest.raises(InvalidPosting):
                call()
            return
        posting = call()
        assert (posting.net, posting.fee, posting.referral_fee) == (net, fee, share)
        assert posting.returned == held.amount - total
        self.model.add("worker", net)
        self.model.add(FEES_ACCOUNT, fee - share)
        if referrer:
            self.model.add(referrer, share)
        self.model.add(held.payer, posting.returned)
        held.status = "posted"
        self.model.operations[key] = ("post", params, posting)

    @rule(hold_id=holds, key=KEYS)
    def void(self, hold_id: str, key: str) -> None:
        held = self.model.holds[hold_id]
        repeated, _ = self._repeat(key, "void", (hold_id,), lambda: self.ledger.void(hold_id, key=key))
        if repeated:
            return
        if held.status != "held":
            with pytest.raises(HoldNotOpen):
                self.ledger.void(hold_id, key=key)
            return
        posting = self.ledger.void(hold_id, key=key)
        assert posting.returned == held.amount
        self.model.add(held.payer, held.amount)
        held.status = "voided"
        self.model.operations[key] = ("void", (hold_id,), posting)

    @rule(hours=st.sampled_from([0, 1, 2]))
    def time_passes_and_holds_expire(self, hours: int) -> None:
        self.clock.now += timedelta(hours=hours)
        expired = {p.hold_id for p in self.ledger.expire_holds()}
        due = {
            hold_id
            for hold_id, held in self.model.holds.items()
            if held.status == "held" and held.expires_at is not None and held.expires_at <= self.clock.now
        }
        assert expired == due
        for hold_id in due:
            held = self.model.holds[hold_id]
            held.status = "expired"
            self.model.add(held.payer, held.amount)

    @rule(key=KEYS)
    def lookup_by_key(self, key: str) -> None:
        found = self.ledger.find_hold(key)
        known = self.model.operations.get(key)
        if known is not None and known[0] == "hold":
            assert found is not None and found.hold_id == known[2].hold_id
            assert found.status == self.model.holds[found.hold_id].status
        else:
            assert found is None

    @invariant()
    def money_is_conserved_and_matches_the_model(self) -> None:
        report = self.ledger.conservation()
        assert report.conserved, report
        assert report.minted == self.model.minted
        assert {a.account_id: a.balance for a in report.accounts} == self.model.balances
        open_holds = sum((h.amount for h in self.model.holds.values() if h.status == "held"), ZERO)
        assert report.held == open_holds

    @invariant()
    def holds_match_the_model(self) -> None:
        for hold_id, held in self.model.holds.items():
            assert self.ledger.get_hold(hold_id).status == held.status

    def teardown(self) -> None:
        self.ledger.close()


LedgerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PODSETTLE_LEDGER_EXAMPLES", "150")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase


# ---------------------------------------------------------------------------------------- concurrency


def _settle_many(path: str, worker: int, rounds: int) -> None:
    """Holds and posts with keys shared between workers: each key must take effect once."""
    book = Ledger(path)
    try:
        for i in range(rounds):
            key = f"job-{i % (rounds // 2)}"
            try:
                hold = book.hold(key=f"{key}:fund", payer="payer", amount="0.50")
                book.post(hold.hold_id, key=f"{key}:release", payee="payee", net="0.495", fee="0.005")
            except LedgerError:
                pass
            book.mint("payee", "0.000001", key=f"tip-{worker}-{i}")
    finally:
        book.close()


def _setup_shared(path: str) -> None:
    book = Ledger(path)
    book.open_account("payer")
    book.open_account("payee")
    book.mint("payer", "100", key="seed")
    book.close()


def _check_shared(path: str, workers: int, rounds: int) -> None:
    book = Ledger(path)
    report = book.conservation()
    assert report.conserved, report
    jobs = rounds // 2
    assert book.balance("payer") == M("100") - jobs * M("0.50")
    assert book.balance("payee") == jobs * M("0.495") + workers * rounds * M("0.000001")
    assert report.minted == M("100") + workers * rounds * M("0.000001")
    book.close()


def test_threads_share_one_ledger_and_each_key_takes_effect_once(tmp_path: Path) -> None:
    path = str(tmp_path / "threads.db")
    _setup_shared(path)
    shared = Ledger(path)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(40):
                key = f"job-{i % 20}"
                try:
                    hold = shared.hold(key=f"{key}:fund", payer="payer", amount="0.50")
                    shared.post(hold.hold_id, key=f"{key}:release", payee="payee", net="0.495", fee="0.005")
                except LedgerError:
                    pass
                shared.mint("payee", "0.000001", key=f"tip-{n}-{i}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    # A second connection on the same file, as another process would have.
    threads.append(threading.Thread(target=_settle_many, args=(path, 4, 40)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared.close()
    assert errors == []
    _check_shared(path, workers=5, rounds=40)


def test_processes_share_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "processes.db")
    _setup_shared(path)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_settle_many, args=(path, n, 40)) for n in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    _check_shared(path, workers=3, rounds=40)
