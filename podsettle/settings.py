"""Configuration from the environment (and flags, which override it), validated with pydantic.

Keys are `SecretStr`: they print as '**********' in reprs, logs and error messages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from podsettle.adapters.persistence import DEFAULT_STORE
from podsettle.domain.escrow_job import check_id

ENVIRONMENT = {
    "store": "PODSETTLE_STORE",
    "escrow_url": "PODSETTLE_ESCROW_URL",
    "escrow_dialect": "PODSETTLE_ESCROW_DIALECT",
    "refund_method": "PODSETTLE_REFUND_METHOD",
    "pf_api_key": "PF_API_KEY",
    "pf_worker_key": "PF_WORKER_KEY",
    "runpod_api_key": "RUNPOD_API_KEY",
    "runpod_base_url": "RUNPOD_ENDPOINT_BASE_URL",
    "payer": "PODSETTLE_PAYER",
    "payee": "PODSETTLE_PAYEE",
    "payees": "PODSETTLE_PAYEES",
    "job_timeout_s": "PODSETTLE_JOB_TIMEOUT_S",
    "concurrency": "PODSETTLE_CONCURRENCY",
    "escrow_rate_limits": "PODSETTLE_ESCROW_RATE_LIMITS",
    "refund_wait_s": "PODSETTLE_REFUND_WAIT_S",
    "refund_poll_s": "PODSETTLE_REFUND_POLL_S",
    "claim_lease_s": "PODSETTLE_CLAIM_LEASE_S",
    "runpod_poll_s": "PODSETTLE_RUNPOD_POLL_S",
    "runpod_runsync_ms": "PODSETTLE_RUNPOD_RUNSYNC_MS",
}


class ConfigError(ValueError):
    """The configuration is incomplete or wrong; the message names the setting (never its secret)."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = DEFAULT_STORE
    escrow_url: str = "https://escrow.purpleflea.com"
    escrow_dialect: Literal["v1", "seed"] = "v1"
    refund_method: Literal["dispute", "timeout"] = "dispute"
    pf_api_key: SecretStr | None = None
    pf_worker_key: SecretStr | None = None
    runpod_api_key: SecretStr | None = None
    runpod_base_url: str = "https://api.runpod.ai/v2"
    payer: str | None = None
    payee: str | None = None
    payees: dict[str, str] = Field(default_factory=dict)
    job_timeout_s: int = Field(default=600, ge=5, le=7 * 24 * 3600)
    concurrency: int = Field(default=32, ge=1, le=10_000)
    # Client-side limits per route and minute; the documented ones (create 20/min, ...) by default.
    escrow_rate_limits: dict[str, int] = Field(default_factory=dict)
    # v1 refunds happen on the service's schedule: how long a call waits for one before it reports
    # the job as "refunding" (the engine keeps looking every refund_poll_s while it runs).
    refund_wait_s: float = Field(default=0.0, ge=0, le=24 * 3600)
    refund_poll_s: float = Field(default=30.0, gt=0, le=3600)
    # How long another engine's unanswered attempt is left to it before this one confirms or redoes
    # it (several engines on one store); also how long a restarted engine waits for a dead one's.
    claim_lease_s: float = Field(default=30.0, ge=0, le=3600)
    # The first status read after a submit; later reads back off (x1.5, at most 5 s) and the
    # client-side limiter keeps them under RunPod's /status limit.
    runpod_poll_s: float = Field(default=0.05, gt=0, le=60)
    # Submit through /runsync, waiting this long for the run to end in the same answer (the contract
    # allows 1000..300000 ms); 0 submits through /run. Until the answer the run's id is unknown: the
    # job cannot be cancelled on RunPod, and an engine that crashes meanwhile submits it again.
    runpod_runsync_ms: int = Field(default=1000, ge=0, le=300_000)

    @field_validator("runpod_runsync_ms")
    @classmethod
    def _runsync_wait(cls, value: int) -> int:
        if 0 < value < 1000:
            raise ValueError("must be 0 (submit through /run) or between 1000 and 300000 ms")
        return value

    @field_validator("escrow_rate_limits", mode="before")
    @classmethod
    def _parse_limits(cls, value: Any) -> Any:
        """`create=100,release=100` in the environment."""
        if isinstance(value, str):
            limits: dict[str, Any] = {}
            for pair in (item.strip() for item in value.split(",") if item.strip()):
                route, sep, number = pair.partition("=")
                if not sep or not number.strip().isdigit() or int(number) < 1:
                    raise ValueError(f"{pair!r} is not route=calls_per_minute")
                limits[route.strip()] = int(number)
            return limits
        return value

    @field_validator("payees", mode="before")
    @classmethod
    def _parse_payees(cls, value: Any) -> Any:
        """`endpoint=ag_worker,other=ag_other` in the environment; a mapping from Python."""
        if isinstance(value, str):
            pairs = [item.strip() for item in value.split(",") if item.strip()]
            parsed: dict[str, str] = {}
            for pair in pairs:
                endpoint, sep, payee = pair.partition("=")
                if not sep or not endpoint.strip() or not payee.strip():
                    raise ValueError(f"{pair!r} is not endpoint=payee")
                parsed[endpoint.strip()] = payee.strip()
            return parsed
        return value

    @field_validator("payer", "payee")
    @classmethod
    def _agent_id(cls, value: str | None) -> str | None:
        return check_id(value, "agent id", optional=True)

    @field_validator("escrow_url", "runpod_base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment; keyword overrides (flags) win; None overrides are ignored."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            name: env[var] for name, var in ENVIRONMENT.items() if env.get(var, "").strip() != ""
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as error:
            raise ConfigError(describe(error)) from None

    def payee_for(self, endpoint_id: str, override: str | None = None) -> str:
        payee = override or self.payees.get(endpoint_id) or self.payee
        if not payee:
            raise ConfigError(
                f"no payee for endpoint {endpoint_id!r}: pass payee=..., or set PODSETTLE_PAYEE "
                "or PODSETTLE_PAYEES=endpoint=ag_worker"
            )
        return payee


def describe(error: ValidationError) -> str:
    """One line per problem, naming the setting (and its environment variable), never the value of a key."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a rule over several settings: its message names them
            lines.append(message)
            continue
        name = ".".join(str(part) for part in problem["loc"])
        var = ENVIRONMENT.get(str(problem["loc"][0]))
        where = f"{name} ({var})" if var else name
        lines.append(f"{where}: {message}")
    return "; ".join(lines)
