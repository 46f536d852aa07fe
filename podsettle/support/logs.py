"""structlog, configured once by the composition root (JSON lines when stderr is not a terminal).

Embedding runtimes that configure structlog themselves keep their configuration: podsettle only
configures it when asked to (the CLI and `Engine.from_env` do), and only once.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_configured = False
# The lowest level each filtering logger class that podsettle installed lets through.
_MIN_LEVELS: dict[type, int] = {}
SECRET_FIELDS = frozenset({"api_key", "authorization", "key", "token", "password", "secret"})


def _drop_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: a field that is named like a secret never reaches a log line."""
    for name in list(event_dict):
        if name.lower() in SECRET_FIELDS:
            event_dict[name] = "[redacted]"
    return event_dict


def configure_logging(*, json: bool | None = None, level: str | None = None, force: bool = False) -> None:
    """Log lines go to stderr (stdout stays clean for --json output); level from PODSETTLE_LOG_LEVEL."""
    level = (level or os.environ.get("PODSETTLE_LOG_LEVEL") or "WARNING").upper()
    if level not in logging.getLevelNamesMapping():
        level = "WARNING"
    global _configured
    if (_configured or structlog.is_configured()) and not force:
        return  # configured already, by us or by the runtime that embeds podsettle
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    wrapper = structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level])
    _MIN_LEVELS[wrapper] = logging.getLevelNamesMapping()[level]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=wrapper,
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,  # a runtime that configures structlog later still gets our lines
    )
    _configured = True


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written (a test runner or an embedding runtime may
    replace it after logging was configured, and close the stream it replaced)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def enabled(level: int) -> bool:
    """Whether a line at `level` (`logging.INFO`, ...) would be written: lets a hot path skip building
    a line that the configured level drops. True whenever structlog is configured by someone else
    (their filter decides), so it never hides a line that would have been written."""
    minimum = _MIN_LEVELS.get(structlog.get_config()["wrapper_class"])
    return minimum is None or level >= minimum


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
