"""Log levels: hot paths skip lines the level drops, and never hide a line that would be written."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from podsettle import Engine
from podsettle.support import logs


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
