"""Bad answers from outside: each gives a clear typed error, and no money moves in the engine's view.

A money-moving call (create, release, cancel) that gets an answer it cannot trust raises
`OutcomeUnknown` (it may have happened) or `AmountMismatch` (it happened, not as agreed); a read
raises `BadResponse` or `Unavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from podsettle.adapters.http import Answer, Request
from podsettle.adapters.ports import (
    AmountMismatch,
    BadResponse,
    Conflict,
    EscrowStatus,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Unavailable,
)
from podsettle.adapters.purpleflea import PurpleFleaEscrow, purple_flea
from podsettle.domain.money import to_money
from podsettle.domain.rules import split

ESCROW = "esc_d1dd5da3f1a3404a"
HTML = "<html><head><title>502 Bad Gateway</title></head><body><h1>502</h1>cloudflare</body></html>"

CREATED = (
    '{"escrow_id":"esc_d1dd5da3f1a3404a","amount_usd":0.5,"commission_usd":0.005,"net_to_counterparty":0.495,'
    '"description":"RunPod job","creator_id":"ag_payer","counterparty_id":"ag_worker","status":"funded",'
    '"timeout_hours":2,"auto_release_at":"2026-11-28T01:04:57.000Z","next_steps":{},"_info":{"version":"1.0.0"}}'
)
RELEASED = (
    '{"escrow_id":"esc_d1dd5da3f1a3404a","status":"released","amount_released":0.495,"commission":0.005,'
    '"referral_commission":0,"counterparty_id":"ag_worker","message":"$0.49 released to counterparty."}'
)
VIEW = (
    '{"escrow_id":"esc_d1dd5da3f1a3404a","status":"refunded","amount_usd":0.5,"commission_usd":0.005,'
    '"net_to_counterparty":0.495,"creator_id":"ag_payer","counterparty_id":"ag_worker",'
    '"auto_release_at":"2026-11-28T01:04:57.000Z"}'
)

Reply = Callable[[Request], Answer]
REFUSED_KEY = ConnectionKey("escrow.test", 443, True, True, None, None, None)


def answer(status: int, text: str, content_type: str = "application/json", **headers: str) -> Reply:
    def reply(request: Request) -> Answer:
        return Answer.of(status, text=text, headers={"content-type": content_type, **headers})

    return reply


def fails_with(error: Exception) -> Reply:
    def reply(request: Request) -> Answer:
        raise error

    return reply


def adapter(reply: Reply, **kwargs: Any) -> PurpleFleaEscrow:
    return purple_flea(
        "https://escrow.test",
        payer_key="pf_live_payer_secret",
        replier=reply,
        **kwargs,
    )


def edited(text: str, **changes: Any) -> str:
    """The JSON text with fields replaced by raw JSON fragments (None drops the field)."""
    data = json.loads(text, parse_float=Decimal)
    out = []
    for name, value in data.items():
        if name in changes:
            if changes[name] is None:
                continue
            out.append(f'"{name}":{changes[name]}')
        else:
            out.append(
                f'"{name}":{json.dumps(value, default=str) if not isinstance(value, Decimal) else value}'
            )
    return "{" + ",".join(out) + "}"


async def create(pf: PurpleFleaEscrow, amount: str = "0.50") -> Any:
    return await pf.create(
        key="job:fund", payee="ag_worker", amount=to_money(amount), description="RunPod job", timeout_hours=2
    )


async def test_a_good_create_is_read_exactly_and_extra_fields_are_ignored() -> None:
    async with adapter(answer(201, CREATED)) as pf:
        receipt = await create(pf)
    assert (receipt.amount, receipt.fee, receipt.net) == (Decimal("0.5"), Decimal("0.005"), Decimal("0.495"))
    assert str(receipt.fee) == "0.005000"


async def test_amounts_that_floats_cannot_hold_are_parsed_exactly() -> None:
    body = edited(CREATED, amount_usd="2.345678", commission_usd="0.023457", net_to_counterparty="2.322221")
    async with adapter(answer(201, body)) as pf:
        receipt = await create(pf, "2.345678")
    assert (receipt.fee, receipt.net) == (Decimal("0.023457"), Decimal("2.322221"))


@pytest.mark.parametrize(
    ("status", "text", "content_type", "says"),
    [
        (502, HTML, "text/html", "HTTP 502"),
        (200, HTML, "text/html", "not JSON (text/html"),
        (201, CREATED[:57], "application/json", "not JSON"),
        (201, "[1, 2]", "application/json", "not a JSON object"),
        (201, edited(CREATED, commission_usd=None), "application/json", "commission_usd: Field required"),
        (
            201,
            edited(CREATED, commission_usd='"0.005"'),
            "application/json",
            "must be a JSON number, not str",
        ),
        (201, edited(CREATED, escrow_id="17"), "application/json", "escrow_id"),
        (201, edited(CREATED, net_to_counterparty="-0.495"), "application/json", "is negative"),
        (201, edited(CREATED, commission_usd="0.0050001"), "application/json", "more than 6 decimal places"),
        (201, edited(CREATED, amount_usd="true"), "application/json", "not bool"),
        (201, edited(CREATED, status='"pending"'), "application/json", "status"),
        (201, edited(CREATED, status='"released"'), "application/json", "status 'released'"),
        (
            500,
            '{"error":"debit_failed","message":"db locked"}',
            "application/json",
            "debit_failed: db locked",
        ),
        (418, '{"error":"teapot"}', "application/json", "not in the contract"),
        (204, "", "application/json", "unexpected success status 204"),
    ],
)
async def test_untrustworthy_create_answers_are_outcome_unknown(
    status: int, text: str, content_type: str, says: str
) -> None:
    async with adapter(answer(status, text, content_type)) as pf:
        with pytest.raises(OutcomeUnknown) as caught:
            await create(pf)
    assert says in str(caught.value)
    assert "may or may not have taken effect" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"commission_usd": "0.006", "net_to_counterparty": "0.494"}, "fee 0.006000"),
        ({"amount_usd": "0.6", "commission_usd": "0.006", "net_to_counterparty": "0.594"}, "amount 0.600000"),
        ({"net_to_counterparty": "0.5"}, "net 0.500000"),
    ],
)
async def test_a_fee_or_amount_that_does_not_match_is_amount_mismatch(
    changes: dict[str, str], field: str
) -> None:
    async with adapter(answer(201, edited(CREATED, **changes))) as pf:
        with pytest.raises(AmountMismatch) as caught:
            await create(pf)
    assert field in str(caught.value)
    assert caught.value.reported["escrow_id"] == ESCROW


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), OutcomeUnknown),
        (aiohttp.ServerDisconnectedError(), OutcomeUnknown),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), OutcomeUnknown),
        (aiohttp.ClientPayloadError("Response payload is not completed"), OutcomeUnknown),
        (TimeoutError(), OutcomeUnknown),
        (aiohttp.ClientConnectorError(REFUSED_KEY, ConnectionRefusedError(111, "refused")), Unavailable),
        (aiohttp.ConnectionTimeoutError("Connection timeout to host"), Unavailable),
    ],
)
async def test_transport_failures_on_create(error: Exception, kind: type[Exception]) -> None:
    async with adapter(fails_with(error)) as pf:
        with pytest.raises(kind) as caught:
            await create(pf)
    assert type(error).__name__ in str(caught.value)


async def test_a_create_answer_whose_bytes_are_not_text_is_untrusted() -> None:
    def reply(request: Request) -> Answer:
        body = CREATED.encode().replace(b"RunPod", b"Run\xffPod")  # not UTF-8
        return Answer.of(201, content=body, headers={"content-type": "application/json"})

    async with adapter(reply) as pf:
        with pytest.raises(OutcomeUnknown, match="body is not JSON"):
            await create(pf)


async def test_rejections_with_html_bodies_are_still_rejections() -> None:
    async with adapter(answer(400, "<h1>Bad Request</h1>", "text/html")) as pf:
        with pytest.raises(Rejected) as caught:
            await create(pf)
    assert caught.value.status_code == 400 and "no JSON error body" in str(caught.value)


async def test_rate_limited_reads_retry_after_from_header_or_body() -> None:
    async with adapter(answer(429, '{"error":"rate_limited"}', **{"retry-after": "7"})) as pf:
        with pytest.raises(RateLimited) as caught:
            await create(pf)
    assert caught.value.retry_after == 7.0
    async with adapter(answer(429, '{"error":"rate_limited","retry_after":3}')) as pf:
        with pytest.raises(RateLimited) as caught:
            await create(pf)
    assert caught.value.retry_after == 3.0


# ---------------------------------------------------------------------------------------- release


@pytest.mark.parametrize(
    ("body", "kind", "says"),
    [
        (edited(RELEASED, amount_released="0.49"), AmountMismatch, "net 0.490000"),
        (edited(RELEASED, commission="0.004", amount_released="0.496"), AmountMismatch, "fee 0.004000"),
        (edited(RELEASED, referral_commission="0.0001"), AmountMismatch, "referral 0.000100"),
        (edited(RELEASED, escrow_id='"esc_0000000000000000"'), OutcomeUnknown, "not 'esc_d1dd5da3f1a3404a'"),
        (edited(RELEASED, status='"funded"'), OutcomeUnknown, "status"),
        (edited(RELEASED, amount_released=None), OutcomeUnknown, "amount_released: Field required"),
        (RELEASED[:40], OutcomeUnknown, "not JSON"),
    ],
)
async def test_bad_release_answers(body: str, kind: type[Exception], says: str) -> None:
    async with adapter(answer(200, body)) as pf:
        with pytest.raises(kind) as caught:
            await pf.release(ESCROW, key="job:release", expected=split(to_money("0.50")))
    assert says in str(caught.value)


async def test_release_reports_the_referral_share_when_it_is_fifteen_percent() -> None:
    async with adapter(answer(200, edited(RELEASED, referral_commission="0.00075"))) as pf:
        settlement = await pf.release(ESCROW, key="k", expected=split(to_money("0.50")))
    assert settlement.referral_fee == Decimal("0.00075")


async def test_release_5xx_is_outcome_unknown() -> None:
    async with adapter(answer(503, HTML, "text/html")) as pf:
        with pytest.raises(OutcomeUnknown, match="HTTP 503"):
            await pf.release(ESCROW, key="k", expected=split(to_money("0.50")))


async def test_release_409_reads_the_escrow() -> None:
    def reply(request: Request) -> Answer:
        if request.method == "POST":
            return Answer.of(409, json={"error": "invalid_status"})
        return Answer.of(200, text=VIEW)

    async with adapter(reply) as pf:
        with pytest.raises(Conflict) as caught:
            await pf.release(ESCROW, key="k", expected=split(to_money("0.50")))
    assert caught.value.status == "refunded"


# ---------------------------------------------------------------------------------------- reads


@pytest.mark.parametrize(
    ("status", "text", "kind", "says"),
    [
        (200, HTML, BadResponse, "not JSON"),
        (200, VIEW[:30], BadResponse, "not JSON"),
        (200, edited(VIEW, amount_usd=None), BadResponse, "amount_usd: Field required"),
        (200, edited(VIEW, status='"pending"'), BadResponse, "status"),
        (200, edited(VIEW, commission_usd="-0.005"), BadResponse, "is negative"),
        (200, edited(VIEW, commission_usd='"0.005"'), BadResponse, "JSON number"),
        (200, edited(VIEW, escrow_id='"esc_other"'), BadResponse, "esc_other"),
        (503, HTML, Unavailable, "HTTP 503"),
        (500, '{"error":"internal_error"}', Unavailable, "internal_error"),
    ],
)
async def test_bad_reads(status: int, text: str, kind: type[Exception], says: str) -> None:
    async with adapter(answer(status, text)) as pf:
        with pytest.raises(kind) as caught:
            await pf.get(ESCROW)
    assert says in str(caught.value)
    assert not isinstance(caught.value, OutcomeUnknown)


async def test_read_timeouts_are_unavailable_and_retryable() -> None:
    async with adapter(fails_with(aiohttp.SocketTimeoutError("slow"))) as pf:
        with pytest.raises(Unavailable) as caught:
            await pf.get(ESCROW)
    assert caught.value.retryable


async def test_v1_refund_checks_what_the_read_reports() -> None:
    async with adapter(answer(200, VIEW)) as pf:
        settlement = await pf.refund(ESCROW, key="k", reason="failed")
    assert settlement.status is EscrowStatus.REFUNDED
    assert (settlement.returned, settlement.fee) == (Decimal("0.495"), Decimal("0.005"))
    wrong_fee = edited(VIEW, commission_usd="0.05", net_to_counterparty="0.45")
    async with adapter(answer(200, wrong_fee)) as pf:
        with pytest.raises(AmountMismatch, match=r"fee 0\.050000"):
            await pf.refund(ESCROW, key="k", reason="failed")


async def test_seed_create_without_an_escrow_id_is_outcome_unknown() -> None:
    async with adapter(answer(201, '{"id":"x"}'), dialect="seed", payer_id="ag_payer") as pf:
        with pytest.raises(OutcomeUnknown, match="escrow_id: Field required"):
            await create(pf)
    async with adapter(
        answer(200, '{"escrow_id":"esc_1","status":"funded"}'), dialect="seed", payer_id="ag_p"
    ) as pf:
        pf.expect("esc_1", to_money("0.5"))
        with pytest.raises(OutcomeUnknown, match="status"):
            await pf.refund("esc_1", key="k", reason="x")


def test_configuration_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="dialect"):
        purple_flea(payer_key="k", dialect="v2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="payer_key"):
        purple_flea(payer_key=" ")
    with pytest.raises(ValueError, match="payer_id"):
        purple_flea(payer_key="k", dialect="seed")
    with pytest.raises(ValueError, match="refund_method"):
        purple_flea(payer_key="k", refund_method="cancel")  # type: ignore[arg-type]
