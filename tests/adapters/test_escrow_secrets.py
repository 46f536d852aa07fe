"""No API key in any log line, exception text, traceback or repr.

The adapter runs a whole lifecycle against the sandbox, plus its failure paths (unknown key, wrong
party, conflicts, lost answers, a server that echoes the key back), with structlog rendering JSON at
DEBUG and the standard library's loggers (aiohttp, uvicorn) captured too.
"""

from __future__ import annotations

import io
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from podsettle.adapters.http import Answer, Request
from podsettle.adapters.ports import GatewayError
from podsettle.adapters.purpleflea import purple_flea
from podsettle.domain.money import to_money
from podsettle.domain.rules import split
from podsettle.support.logs import configure_logging
from tests.escrow_sandbox_helpers import running_sandbox


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """structlog rendering JSON at DEBUG into a buffer, *without* podsettle's own redaction of fields
    named like secrets: the adapter must not hand a key to the logger in the first place."""
    buffer = io.StringIO()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=buffer),
        cache_logger_on_first_use=False,
    )
    yield buffer
    structlog.reset_defaults()
    configure_logging("WARNING", force=True)  # as the session's conftest left it


def _texts(error: BaseException) -> list[str]:
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


async def test_keys_never_leak_through_a_whole_lifecycle(
    json_logs: io.StringIO, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []

    async def expect_error(call: Any) -> None:
        try:
            await call
        except (GatewayError, NotImplementedError) as e:
            errors.append(e)
        else:  # pragma: no cover - every call below must fail
            raise AssertionError("the call should have failed")

    with running_sandbox() as box:
        payer, payer_key = box.agent("10.00")
        worker, worker_key = box.agent("0")
        _, stranger_key = box.agent("0")
        keys = [payer_key, worker_key, stranger_key]
        async with box.adapter(payer_key, worker_key=worker_key) as pf:
            adapters: list[Any] = [pf]
            receipt = await pf.create(
                key="job:fund",
                payee=worker,
                amount=to_money("1.00"),
                description="RunPod job",
                timeout_hours=2,
            )
            await pf.complete(receipt.escrow_id)
            await pf.release(receipt.escrow_id, key="job:release", expected=split(to_money("1.00")))
            await expect_error(pf.complete(receipt.escrow_id))
            await expect_error(pf.refund(receipt.escrow_id, key="job:refund", reason="late"))
            other = await pf.create(
                key="job2:fund",
                payee=worker,
                amount=to_money("1.00"),
                description="RunPod job",
                timeout_hours=2,
            )
            await expect_error(pf.refund(other.escrow_id, key="job2:refund", reason="failed"))
            box.fault("release", "drop_after", close=True)
            await expect_error(pf.release(other.escrow_id, key="k", expected=split(to_money("1.00"))))
            await expect_error(
                pf.create(key="k", payee=payer, amount=to_money("1"), description="x y z", timeout_hours=1)
            )
            await expect_error(pf.find_by_key("job:fund"))
        async with box.adapter(stranger_key) as stranger:
            adapters.append(stranger)
            await expect_error(stranger.release(other.escrow_id, key="k", expected=split(to_money("1.00"))))
        async with box.adapter("pf_live_wrong_key_0123456789") as wrong:
            keys.append("pf_live_wrong_key_0123456789")
            adapters.append(wrong)
            await expect_error(
                wrong.create(key="k", payee=worker, amount=to_money("1"), description="abc", timeout_hours=1)
            )

    def echo(request: Request) -> Answer:
        # A server that puts the caller's key into its error message and its HTML page.
        auth = request.headers["authorization"]
        if request.method == "GET":
            return Answer.of(502, text=f"<html>{auth}</html>", headers={"content-type": "text/html"})
        return Answer.of(401, json={"error": "unauthorized", "message": f"unknown key {auth}"})

    echo_key = "pf_live_echoed_secret_key_42"
    keys.append(echo_key)
    async with purple_flea(
        "https://escrow.test", payer_key=echo_key, worker_key=worker_key, replier=echo
    ) as echoing:
        adapters.append(echoing)
        await expect_error(echoing.release("esc_1", key="k", expected=split(to_money("1"))))
        await expect_error(echoing.get("esc_1"))

    assert len(errors) == 10
    logged = capsys.readouterr()
    texts = [json_logs.getvalue(), logged.out, logged.err, caplog.text]
    texts += [text for error in errors for text in _texts(error)]
    texts += [repr(a) for a in adapters] + [repr(vars(a)) for a in adapters]
    assert any("escrow.created" in t for t in texts), "the structlog lines were not captured"
    assert any("unknown key Bearer [redacted]" in t for t in texts)
    for key in keys:
        leaks = [t for t in texts if key in t]
        assert leaks == [], f"a key leaked into: {leaks[0][:300]}"
