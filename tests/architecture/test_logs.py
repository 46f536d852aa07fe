"""Log levels (hot paths skip lines the level drops, and never hide a line that would be written),
and redaction: idempotency keys are written, credentials and registered secrets never are, and
redacting a short secret never cuts letters out of other words."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from podsettle import Engine
from podsettle.domain.money import to_money
from podsettle.domain.rules import split
from podsettle.support import logs
from tests.escrow_sandbox_helpers import running_sandbox


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logs.configure_logging(force=True)


def test_enabled_follows_the_level_podsettle_configured() -> None:
    logs.configure_logging(level="WARNING", force=True)
    assert not logs.enabled(logging.INFO)
    assert logs.enabled(logging.WARNING) and logs.enabled(logging.ERROR)
    logs.configure_logging(level="DEBUG", force=True)
    assert logs.enabled(logging.DEBUG) and logs.enabled(logging.INFO)


def test_a_runtime_that_configures_structlog_itself_decides_alone() -> None:
    logs.configure_logging(level="ERROR", force=True)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    assert logs.enabled(logging.DEBUG)


async def _lines(level: str) -> list[dict[str, object]]:
    logs.configure_logging(level=level, force=True, json=True)
    with capture_logs() as captured:
        async with Engine.in_process("memory") as engine:
            result = await engine.run_paid_job("echo", {"prompt": "hello"}, "0.25", job_key="log-levels-1")
    assert result.paid
    return captured


async def test_the_processors_info_lines_are_written_at_info_and_skipped_at_warning() -> None:
    at_info = await _lines("INFO")
    attempts = [line for line in at_info if line["event"] == "effect.attempt"]
    assert [line["step"] for line in attempts] == ["fund", "start", "release"]
    assert all(line["job_key"] == "log-levels-1" and line["job_id"] for line in attempts)
    assert any(line["event"] == "escrow.released" and line["to_payee"] == "0.247500" for line in at_info)
    at_warning = await _lines("WARNING")
    assert [line for line in at_warning if line["log_level"] == "info"] == []


# ------------------------------------------------------------------------------------- redaction


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> logs.Redactor:
    """A fresh set of registered secrets for the test (`hide()` registers for the whole process)."""
    fresh = logs.Redactor()
    monkeypatch.setattr(logs, "_SECRETS", fresh)
    return fresh


def _written(capsys: pytest.CaptureFixture[str]) -> tuple[str, list[dict[str, Any]]]:
    text = capsys.readouterr().err
    return text, [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_escrow_log_lines_show_the_idempotency_key_and_never_an_api_key(
    secrets: logs.Redactor, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure_logging("INFO", json=True, force=True)
    with running_sandbox() as box:
        _, payer_key = box.agent("10.00")
        worker, worker_key = box.agent("0")
        logs.hide(payer_key, worker_key)
        async with box.adapter(payer_key, worker_key=worker_key) as escrow:
            receipt = await escrow.create(
                key="job-7:fund", payee=worker, amount=to_money("1.00"), description="job", timeout_hours=2
            )
            await escrow.complete(receipt.escrow_id)
            await escrow.release(receipt.escrow_id, key="job-7:release", expected=split(to_money("1.00")))
    text, lines = _written(capsys)
    keys = {line["event"]: line.get("key") for line in lines}
    assert keys["escrow.created"] == "job-7:fund"
    assert keys["escrow.released"] == "job-7:release"
    assert payer_key not in text and worker_key not in text


def test_credentials_and_registered_secrets_never_reach_a_line(
    secrets: logs.Redactor, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure_logging("DEBUG", json=True, force=True)
    configured = "pf_live_configured_secret_0042"
    logs.hide(configured, None, "  ")
    fields = {
        "api_key": "k-api",
        "Authorization": "Bearer t-auth",
        "token": "t-token",
        "password": "p-word",
        "secret": "s-value",
        "payer_key": "k-payer",
        "access_token": "t-access",
        "client_secret": "s-client",
    }
    log = logs.get_logger("test")
    log.info(
        "call",
        job_key="job-9",
        idempotency_key="job-9:fund",
        detail=f"unknown key Bearer {configured}",
        echoed=configured,
        nested={"api_key": "k-nested", "note": [configured, "fine"]},
        **fields,
    )
    try:
        raise RuntimeError(f"server said {configured}")
    except RuntimeError:
        log.exception("failed")
    text, lines = _written(capsys)
    for value in [configured, *fields.values(), "k-nested"]:
        assert value not in text, value
    call = lines[0]
    assert call["job_key"] == "job-9" and call["idempotency_key"] == "job-9:fund"
    assert call["detail"] == "unknown key Bearer [redacted]" and call["echoed"] == "[redacted]"
    assert call["nested"] == {"api_key": "[redacted]", "note": ["[redacted]", "fine"]}
    assert all(call[name] == "[redacted]" for name in fields)
    assert "server said [redacted]" in lines[1]["exception"]


def test_a_short_secret_is_redacted_as_a_whole_token_and_never_cuts_words(
    secrets: logs.Redactor, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure_logging("INFO", json=True, force=True)
    logs.hide("x", "abc")
    logs.get_logger("test").info(
        "escrow.bad_response", detail="escrow esc_1 does not exist (key x, then abc); abcd is fine", key="x"
    )
    _, lines = _written(capsys)
    assert lines[0]["detail"] == (
        "escrow esc_1 does not exist (key [redacted], then [redacted]); abcd is fine"
    )
    assert lines[0]["key"] == "[redacted]"  # an idempotency key equal to a secret is still a secret
    assert lines[0]["event"] == "escrow.bad_response"


@pytest.mark.parametrize(
    ("secrets_", "text", "expected"),
    [
        (["x"], "does not exist", "does not exist"),
        (["x"], "x", "[redacted]"),
        (["x"], "key=x&y", "key=[redacted]&y"),
        (["sandbox"], "sandbox-key sandbox_1 sandbox.", "sandbox-key sandbox_1 [redacted]."),
        # Long enough to be unambiguous: redacted even inside a longer token.
        (["pf_live_0123456789"], "tokpf_live_0123456789z", "tok[redacted]z"),
        (["abc", "abc def ghi jkl"], "abc def ghi jkl", "[redacted]"),
        ([], "anything", "anything"),
    ],
)
def test_the_redactor(secrets_: list[str], text: str, expected: str) -> None:
    assert logs.Redactor(secrets_).redact(text) == expected


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("key", False),
        ("job_key", False),
        ("idempotency_key", False),
        ("escrow_id", False),
        ("keys_sent", False),
        ("api_key", True),
        ("API_KEY", True),
        ("pf_api_key", True),
        ("worker_key", True),
        ("authorization", True),
        ("bearer_token", True),
        ("db_password", True),
        ("secret", True),
    ],
)
def test_which_field_names_hold_credentials(name: str, secret: bool) -> None:
    assert logs.is_secret_field(name) is secret


async def test_the_production_wiring_registers_its_keys_as_secrets(
    secrets: logs.Redactor, capsys: pytest.CaptureFixture[str]
) -> None:
    from podsettle.settings import Settings

    keys = {"pf_api_key": "pf_k1", "pf_worker_key": "pf_worker_k2", "runpod_api_key": "rpa_K3"}
    settings = Settings(store="memory", payer="ag_payer", **keys)  # type: ignore[arg-type]
    engine = Engine.from_env(settings)
    await engine.aclose()
    logs.configure_logging("INFO", json=True, force=True)
    logs.get_logger("test").info("echo", detail=" ".join(keys.values()))
    _, lines = _written(capsys)
    assert lines[0]["detail"] == "[redacted] [redacted] [redacted]"
