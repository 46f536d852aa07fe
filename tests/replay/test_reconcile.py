"""Reconciliation against a small fake escrow service: every difference is listed, nothing else."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from podsettle import Settlements
from podsettle.adapters.ports import (
    EscrowCapabilities,
    EscrowGateway,
    EscrowReceipt,
    EscrowStatus,
    EscrowView,
    NotFound,
    Settlement,
    Unavailable,
)
from podsettle.domain import Step
from podsettle.domain.money import Money
from podsettle.domain.rules import FeeSplit
from podsettle.replay import reconcile
from tests.histories import Plan, open_job, run, steps


class FakeEscrow:
    """The escrow service as a dict of views; `get` is all reconciliation uses (and `find_by_key`)."""

    def __init__(self, *, lookup_by_key: bool = False) -> None:
        self.capabilities = EscrowCapabilities(
            idempotent_create=False, lookup_by_key=lookup_by_key, cancel=False
        )
        self.escrows: dict[str, EscrowView] = {}
        self.by_key: dict[str, EscrowView] = {}
        self.broken: set[str] = set()
        self.reads = 0

    async def create(
        self,
        *,
        key: str,
        payee: str,
        amount: Money,
        description: str,
        timeout_hours: int,
        referral: str | None = None,
        metadata: dict[str, str] | None = None,
        send_within_s: float | None = None,
    ) -> EscrowReceipt:
        raise NotImplementedError("reconciliation never creates escrows")

    async def release(self, escrow_id: str, *, key: str, expected: FeeSplit) -> Settlement:
        raise NotImplementedError("reconciliation never releases escrows")

    async def health(self) -> None:
        return None

    async def balance(self) -> Money | None:
        return None

    async def refund(self, escrow_id: str, *, key: str, reason: str, expected: object = None) -> Settlement:
        raise NotImplementedError("reconciliation never refunds escrows")

    async def get(self, escrow_id: str) -> EscrowView:
        self.reads += 1
        if escrow_id in self.broken:
            raise Unavailable("503 from the escrow service")
        try:
            return self.escrows[escrow_id]
        except KeyError:
            raise NotFound(escrow_id) from None

    async def find_by_key(self, key: str) -> EscrowView | None:
        return self.by_key.get(key)

    async def aclose(self) -> None:
        return None


def mirror(app: Settlements, fake: FakeEscrow) -> None:
    """Make the fake service agree with the log: every escrow where the log says it is."""
    for job_id in app.job_ids():
        job = app.get_job(job_id)
        if job.escrow_id is not None:
            status = {
                "RELEASED": EscrowStatus.RELEASED,
                "REFUNDED": EscrowStatus.REFUNDED,
            }.get(str(job.state), EscrowStatus.FUNDED)
            assert job.funded_amount is not None and job.fee is not None and job.net is not None
            fake.escrows[job.escrow_id] = EscrowView(
                job.escrow_id, status, job.funded_amount, job.fee, job.net, job.payer, job.payee
            )
        if job.bonus_escrow_id is not None and job.bonus_funded is not None:
            bonus = job.bonus_funded
            bonus_status = EscrowStatus.RELEASED if job.bonus_awarded else EscrowStatus.FUNDED
            fake.escrows[job.bonus_escrow_id] = EscrowView(
                job.bonus_escrow_id, bonus_status, bonus.amount, bonus.fee, bonus.net
            )


def settled(app: Settlements) -> dict[str, str]:
    plans = [
        Plan("paid", "released"),
        Plan("bonus", "bonus"),
        Plan("refunded", "refunded"),
        Plan("rejected", "rejected"),
        Plan("parked", "attention_left"),
    ]
    running = Plan("running", "released")
    run(app, plans)
    job = open_job(running)
    app.save(job)
    for save in steps(running)[:4]:  # funded, started: the escrow holds the money
        for command in save:
            command(job)
        app.save(job)
    return {p.key: f"esc-{p.key}" for p in [*plans, running]}


async def test_a_service_that_agrees_with_the_log_gives_no_difference() -> None:
    app = Settlements("memory")
    settled(app)
    fake = FakeEscrow()
    mirror(app, fake)
    assert isinstance(fake, EscrowGateway)
    report = await reconcile(app, fake)
    # Only the job parked for an operator is listed: its escrow's status is what settles it.
    assert [(d.job_key, d.kind) for d in report.differences] == [("parked", "status")]
    assert report.jobs == 6
    assert report.escrows_checked == fake.reads == 6  # five job escrows and one bonus escrow


async def test_an_escrow_refunded_by_timeout_while_the_log_says_funded_is_listed() -> None:
    app = Settlements("memory")
    escrows = settled(app)
    fake = FakeEscrow()
    mirror(app, fake)
    swept = escrows["running"]
    fake.escrows[swept] = replace(fake.escrows[swept], status=EscrowStatus.REFUNDED)
    report = await reconcile(app, fake)
    found = [d for d in report.differences if d.job_key == "running"]
    assert len(found) == 1
    assert (found[0].kind, found[0].escrow_id, found[0].service) == ("status", swept, "refunded")
    assert "funded" in found[0].log
    assert not report.ok
    assert "running" in report.render() and report.to_json()["differences"][0]["job_key"] in (
        "running",
        "parked",
    )


async def test_every_kind_of_difference_is_listed() -> None:
    app = Settlements("memory")
    escrows = settled(app)
    # A job whose funding was attempted and whose response was lost.
    lost = open_job(Plan("lost", "released"))
    lost.record_attempt(Step.FUND, "proc-1")
    app.save(lost)
    fake = FakeEscrow(lookup_by_key=True)
    mirror(app, fake)
    fake.escrows[escrows["paid"]] = replace(fake.escrows[escrows["paid"]], status=EscrowStatus.FUNDED)
    fake.escrows[escrows["refunded"]] = replace(fake.escrows[escrows["refunded"]], amount=Decimal("0.400000"))
    del fake.escrows[escrows["bonus"]]
    fake.broken.add(escrows["running"])
    fake.by_key["lost:fund"] = EscrowView(
        "esc-lost", EscrowStatus.FUNDED, Decimal("0.5"), Decimal("0.005"), Decimal("0.495")
    )
    report = await reconcile(app, fake, concurrency=2)
    kinds = sorted((d.job_key, d.kind) for d in report.differences)
    assert kinds == [
        ("bonus", "missing"),
        ("lost", "unrecorded"),
        ("paid", "status"),
        ("parked", "status"),
        ("refunded", "amount"),
        ("running", "unreadable"),
    ]
    amount = next(d for d in report.differences if d.kind == "amount")
    assert (amount.log, amount.service) == ("amount 0.500000", "amount 0.400000")
    assert all(isinstance(d.to_json()["log"], str) for d in report.differences)


async def test_an_escrow_created_by_another_agent_than_the_jobs_payer_is_listed() -> None:
    """The payer in the log is the agent the service charged: an escrow whose `creator_id` names
    another agent is a difference (issue 13: a resume under another key)."""
    app = Settlements("memory")
    escrows = settled(app)
    fake = FakeEscrow()
    mirror(app, fake)
    fake.escrows[escrows["paid"]] = replace(fake.escrows[escrows["paid"]], payer="ag_someone_else")
    report = await reconcile(app, fake, concurrency=2)
    creators = [(d.job_key, d.service) for d in report.differences if d.kind == "creator"]
    assert creators == [("paid", "created by ag_someone_else")]
