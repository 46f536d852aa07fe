"""structlog, configured once by the composition root (JSON lines when stderr is not a terminal).

Embedding runtimes that configure structlog themselves keep their configuration: podsettle only
configures it when asked to (the CLI and the engine wirings do), and only once. The level comes
from the caller (the settings' `log_level`): this bottom layer reads no configuration itself.

Secrets never reach a written line: a field named like a credential is replaced whole, and any
value that is (or contains, as a whole token) a secret the composition root registered with
`hide()` is redacted. Idempotency keys (`key`, `job_key`) are not secrets: they are what an
operator searches the log for, so they are written.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"
# Field names that always hold a credential, and the endings that make a name one (`pf_api_key`,
# `access_token`, `client_secret`, `db_password`).
SECRET_FIELDS = frozenset({"api_key", "apikey", "authorization", "token", "password", "secret", "cookie"})
# Idempotency keys: named `key` but deliberately logged. Any other `*_key` field (`payer_key`,
# `worker_key`) is taken for a credential, so a new key-like name fails closed.
IDEMPOTENCY_FIELDS = frozenset({"key", "job_key", "idempotency_key"})
# A secret at least this long is redacted wherever it appears; a shorter one only where it is a
# whole token, so that redacting a short key never cuts letters out of ordinary words.
MIN_SUBSTRING_SECRET = 12
# Characters that continue a token: a secret found between two of them is part of a longer word.
_TOKEN_CHARS = r"A-Za-z0-9_\-"

_configured = False
# The lowest level each filtering logger class that podsettle installed lets through.
_MIN_LEVELS: dict[type, int] = {}


def is_secret_field(name: str) -> bool:
    """Whether a log field of this name holds a credential (its value is never written)."""
    lowered = name.lower()
    if lowered in IDEMPOTENCY_FIELDS:
        return False
    if lowered in SECRET_FIELDS or lowered.endswith("_key"):
        return True
    return any(lowered.endswith(f"_{word}") for word in SECRET_FIELDS)


class Redactor:
    """Replaces known secret values in text: long ones anywhere, short ones only as whole tokens."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        fresh = {s.strip() for s in secrets if s and s.strip()}
        with self._lock:
            if fresh <= self._secrets:
                return
            self._secrets = self._secrets | fresh
            self._pattern = self._compile(self._secrets)

    @property
    def secrets(self) -> frozenset[str]:
        return self._secrets

    @staticmethod
    def _compile(secrets: frozenset[str]) -> re.Pattern[str]:
        # Longest first, so that a secret that contains another is replaced whole.
        alternatives = []
        for secret in sorted(secrets, key=len, reverse=True):
            escaped = re.escape(secret)
            if len(secret) < MIN_SUBSTRING_SECRET:
                escaped = f"(?<![{_TOKEN_CHARS}]){escaped}(?![{_TOKEN_CHARS}])"
            alternatives.append(escaped)
        return re.compile("|".join(alternatives))

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            return text
        if text in self._secrets:
            return REDACTED
        return pattern.sub(REDACTED, text)

    def redact_value(self, value: Any, depth: int = 0) -> Any:
        """A log field's value with secrets redacted, looking into nested containers a little way."""
        if isinstance(value, str):
            return self.redact(value)
        if depth >= 4:
            return value
        if isinstance(value, Mapping):
            return {
                k: REDACTED if isinstance(k, str) and is_secret_field(k) else self.redact_value(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.redact_value(item, depth + 1) for item in value]
        if isinstance(value, tuple):
            return tuple(self.redact_value(item, depth + 1) for item in value)
        return value


_SECRETS = Redactor()


def hide(*secrets: str | None) -> None:
    """Never write these values (API keys the composition root was given) in a log line."""
    _SECRETS.add(s for s in secrets if s)


def redact(text: str) -> str:
    """`text` with every secret registered through `hide()` replaced by '[redacted]'."""
    return _SECRETS.redact(text)


def _drop_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: a field named like a credential, or a value that is a registered
    secret, never reaches a log line."""
    check_values = _SECRETS.secrets != frozenset()
    for name, value in list(event_dict.items()):
        if is_secret_field(name):
            event_dict[name] = REDACTED
        elif check_values:
            event_dict[name] = _SECRETS.redact_value(value)
    return event_dict


def configure_logging(level: str = "WARNING", *, json: bool | None = None, force: bool = False) -> None:
    """Log lines go to stderr (stdout stays clean for --json output), at `level` (a logging level
    name; an unknown one means WARNING)."""
    level = level.upper()
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
            structlog.processors.format_exc_info,
            _drop_secrets,  # after the traceback is text, so that a key in it is redacted too
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
