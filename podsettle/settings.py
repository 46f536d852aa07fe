"""Configuration from the environment (and flags, which override it), read and validated by
pydantic-settings: the only module of podsettle that reads environment variables.

`Settings.from_env()` reads the environment; `Settings(...)` takes only the values it is given (the
in-process and sandbox wirings must not pick up an operator's production keys). Keys are
`SecretStr`: they print as '**********' in reprs, logs and error messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from podsettle.adapters.persistence import DEFAULT_STORE
from podsettle.domain.errors import InvalidInput
from podsettle.domain.escrow_job import check_id
from podsettle.domain.money import to_money


class ConfigError(ValueError):
    """The configuration is incomplete or wrong; the message names the setting (never its secret)."""


MIN_TOKEN_LENGTH = 16
DEFAULT_CLAIM_LEASE_S = 60.0
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Settings(BaseSettings):
    """Every setting, each read from the environment variable its field names (`validation_alias`)."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        case_sensitive=True,
        validate_by_name=True,  # Settings(store=...) from Python; the variable's name from the environment
        validate_by_alias=True,
    )

    store: str = Field(default=DEFAULT_STORE, validation_alias="PODSETTLE_STORE")
    escrow_url: str = Field(default="https://escrow.purpleflea.com", validation_alias="PODSETTLE_ESCROW_URL")
    escrow_dialect: Literal["v1", "seed"] = Field(default="v1", validation_alias="PODSETTLE_ESCROW_DIALECT")
    # How a failed job's escrow is asked back on the v1 service, recorded on each job when it opens:
    # "timeout" (the default) waits for the service's sweep, the one path its code completes (the
    # escrow's timeout plus up to 5 minutes, the 1% commission kept); "dispute" freezes the escrow for
    # Purple Flea's staff, and the published service has no route that resolves it.
    refund_method: Literal["dispute", "timeout"] = Field(
        default="timeout", validation_alias="PODSETTLE_REFUND_METHOD"
    )
    pf_api_key: SecretStr | None = Field(default=None, validation_alias="PF_API_KEY")
    pf_worker_key: SecretStr | None = Field(default=None, validation_alias="PF_WORKER_KEY")
    runpod_api_key: SecretStr | None = Field(default=None, validation_alias="RUNPOD_API_KEY")
    runpod_base_url: str = Field(
        default="https://api.runpod.ai/v2", validation_alias="RUNPOD_ENDPOINT_BASE_URL"
    )
    payer: str | None = Field(default=None, validation_alias="PODSETTLE_PAYER")
    payee: str | None = Field(default=None, validation_alias="PODSETTLE_PAYEE")
    # NoDecode: the environment holds `endpoint=payee,...`, not JSON (the validators below parse it).
    payees: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, validation_alias="PODSETTLE_PAYEES"
    )
    job_timeout_s: int = Field(
        default=600, ge=5, le=7 * 24 * 3600, validation_alias="PODSETTLE_JOB_TIMEOUT_S"
    )
    concurrency: int = Field(default=32, ge=1, le=10_000, validation_alias="PODSETTLE_CONCURRENCY")
    # Client-side limits per route and minute; the documented ones (create 20/min, ...) by default.
    escrow_rate_limits: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, validation_alias="PODSETTLE_ESCROW_RATE_LIMITS"
    )
    # v1 refunds happen on the service's schedule: how long a call waits for one before it reports
    # the job as "refunding" (the engine keeps looking every refund_poll_s while it runs).
    refund_wait_s: float = Field(default=0.0, ge=0, le=24 * 3600, validation_alias="PODSETTLE_REFUND_WAIT_S")
    refund_poll_s: float = Field(default=30.0, gt=0, le=3600, validation_alias="PODSETTLE_REFUND_POLL_S")
    # How long another engine's unanswered attempt is left to it before this one confirms or redoes
    # it (several engines on one store); also how long a restarted engine waits for a dead one's
    # (a process of this machine that has exited is not waited for). Unset: the longest call a
    # claim covers, at least DEFAULT_CLAIM_LEASE_S; set below that call, the engine refuses to start
    # (a live engine's start would be taken over mid-call and the job run twice).
    claim_lease_s: float | None = Field(
        default=None, ge=0, le=3600, validation_alias="PODSETTLE_CLAIM_LEASE_S"
    )
    # On a stop (SIGINT, SIGTERM, closing the engine), how long calls that move money and are under
    # way are given to finish, so that their outcomes are saved (cut off, a create's is unknown).
    stop_grace_s: float = Field(default=30.0, ge=0, le=600, validation_alias="PODSETTLE_STOP_GRACE_S")
    # The first status read after a submit; later reads back off (x1.5, at most 5 s) and the
    # client-side limiter keeps them under RunPod's /status limit.
    runpod_poll_s: float = Field(default=0.05, gt=0, le=60, validation_alias="PODSETTLE_RUNPOD_POLL_S")
    # Submit through /runsync, waiting this long for the run to end in the same answer (the contract
    # allows 1000..300000 ms); 0 submits through /run. Until the answer the run's id is unknown: the
    # job cannot be cancelled on RunPod, and an engine that crashes meanwhile submits it again.
    runpod_runsync_ms: int = Field(
        default=1000, ge=0, le=300_000, validation_alias="PODSETTLE_RUNPOD_RUNSYNC_MS"
    )
    # Endpoints whose handlers are generators, read through /stream and paid for the parts it
    # delivered (`gen,other` in the environment); none by default. Elsewhere COMPLETED with the empty
    # aggregate [] (a generator without return_aggregate_stream) is no output, and is refunded.
    runpod_streaming: Annotated[frozenset[str], NoDecode] = Field(
        default_factory=frozenset, validation_alias="PODSETTLE_RUNPOD_STREAMING"
    )
    # structlog's level; the composition root and the command line hand it to `configure_logging`.
    log_level: LogLevel = Field(default="WARNING", validation_alias="PODSETTLE_LOG_LEVEL")
    # Where the command line keeps the read models (default: next to a SQLite store, else the cwd).
    views: str | None = Field(default=None, validation_alias="PODSETTLE_VIEWS")
    # Who resolves an ATTENTION job from the command line when --operator is not given.
    operator: str = Field(default="operator", min_length=1, validation_alias="USER")
    # The agent registration and faucet services that `podsettle onboard` calls.
    casino_url: str = Field(default="https://casino.purpleflea.com", validation_alias="PODSETTLE_CASINO_URL")
    faucet_url: str = Field(default="https://faucet.purpleflea.com", validation_alias="PODSETTLE_FAUCET_URL")
    # Spending limits for agents (the MCP tools), set by the operator; unset means no limit of that
    # kind. Checked before anything is opened or funded (podsettle/limits.py).
    limit_max_budget: Decimal | None = Field(default=None, validation_alias="PODSETTLE_LIMIT_MAX_BUDGET")
    limit_daily_total: Decimal | None = Field(default=None, validation_alias="PODSETTLE_LIMIT_DAILY_TOTAL")
    # NoDecode: `a,b` in the environment, not JSON.
    limit_endpoints: Annotated[frozenset[str] | None, NoDecode] = Field(
        default=None, validation_alias="PODSETTLE_LIMIT_ENDPOINTS"
    )
    limit_payees: Annotated[frozenset[str] | None, NoDecode] = Field(
        default=None, validation_alias="PODSETTLE_LIMIT_PAYEES"
    )
    # What this payer entrusts to the engine over the store's life: jobs' budgets and reserved
    # bounties count against it (podsettle/bounties.py, `Commitments`); unset: no such budget.
    payer_budget: Decimal | None = Field(default=None, validation_alias="PODSETTLE_PAYER_BUDGET")
    # `podsettle mcp` on the embedded sandbox of both services (loopback HTTP, a funded payer of its
    # own, no keys) instead of Purple Flea and RunPod: for trying the tools, and for their tests.
    sandbox: bool = Field(default=False, validation_alias="PODSETTLE_SANDBOX")
    # The bearer token `podsettle serve` asks of every request when set; without one it serves loopback
    # only. Long enough that it cannot be guessed over the network.
    token: SecretStr | None = Field(default=None, validation_alias="PODSETTLE_TOKEN")
    # A PostgreSQL store's connection pool, under the library's own names (unset: its defaults, a
    # pool of one connection). An engine's store calls run on one thread; `podsettle serve` and the
    # MCP server read from several, and gain from a few more connections.
    postgres_pool_size: int | None = Field(default=None, ge=1, le=1000, validation_alias="POSTGRES_POOL_SIZE")
    postgres_max_overflow: int | None = Field(
        default=None, ge=0, le=1000, validation_alias="POSTGRES_MAX_OVERFLOW"
    )
    postgres_max_waiting: int | None = Field(default=None, ge=0, validation_alias="POSTGRES_MAX_WAITING")
    postgres_connect_timeout: float | None = Field(
        default=None, gt=0, le=3600, validation_alias="POSTGRES_CONNECT_TIMEOUT"
    )
    postgres_conn_max_age: float | None = Field(default=None, gt=0, validation_alias="POSTGRES_CONN_MAX_AGE")
    postgres_pre_ping: bool | None = Field(default=None, validation_alias="POSTGRES_PRE_PING")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Construction takes only the values given; `from_env` is the one door to the environment."""
        return (init_settings,)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_name(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

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

    @field_validator("runpod_streaming", mode="before")
    @classmethod
    def _parse_streaming(cls, value: Any) -> Any:
        """`gen,other` in the environment; any collection of endpoint ids from Python."""
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list | tuple | set | frozenset):
            return frozenset(check_id(item, "endpoint id") for item in value)
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

    @field_validator("limit_max_budget", "limit_daily_total", "payer_budget", mode="before")
    @classmethod
    def _limit_amount(cls, value: Any) -> Any:
        """A USDC amount given as text (never a float), checked like every amount."""
        if value is None:
            return None
        try:
            return to_money(value.strip() if isinstance(value, str) else value, "limit", allow_zero=False)
        except InvalidInput as error:
            raise ValueError(error.reason) from None

    @field_validator("limit_endpoints", "limit_payees", mode="before")
    @classmethod
    def _parse_names(cls, value: Any) -> Any:
        """`a,b` in the environment; any collection of names from Python; empty names are refused."""
        if value is None:
            return None
        names = value.split(",") if isinstance(value, str) else list(value)
        cleaned = frozenset(str(name).strip() for name in names)
        if not cleaned or "" in cleaned:
            raise ValueError("must name at least one id, separated by commas, with no empty names")
        return cleaned

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters")
        return value

    @field_validator("payer", "payee")
    @classmethod
    def _agent_id(cls, value: str | None) -> str | None:
        return check_id(value, "agent id", optional=True)

    @field_validator("escrow_url", "runpod_base_url", "casino_url", "faucet_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment (or from `environ`, a mapping standing in for it); keyword
        overrides (flags) win; None overrides and blank variables are ignored."""
        source = EnvSettingsSource(cls) if environ is None else _Mapping(cls, environ)
        values: dict[str, Any] = {
            _FIELD_OF.get(name, name): value
            for name, value in source().items()
            if not (isinstance(value, str) and not value.strip())
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as error:
            raise ConfigError(describe(error)) from None

    def store_env(self) -> dict[str, str]:
        """The store's settings for the event-sourcing library (the pool's, for PostgreSQL): the
        variables of the fields that are set, as the library reads them."""
        env: dict[str, str] = {}
        for name in _POOL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                env[ENVIRONMENT[name]] = ("y" if value else "n") if isinstance(value, bool) else str(value)
        return env

    def claim_lease(self, longest_call_s: float) -> float:
        """The claim lease for gateways whose longest call lasts `longest_call_s`: the configured
        one, which must outlast that call, or by default that call and at least DEFAULT_CLAIM_LEASE_S."""
        if self.claim_lease_s is None:
            return max(DEFAULT_CLAIM_LEASE_S, longest_call_s)
        if self.claim_lease_s < longest_call_s:
            raise ConfigError(
                f"PODSETTLE_CLAIM_LEASE_S: {self.claim_lease_s:g} s is shorter than the longest call a "
                f"claim covers ({longest_call_s:g} s, from the services' timeouts and "
                "PODSETTLE_RUNPOD_RUNSYNC_MS): another engine would take over a live engine's call "
                f"mid-way and make it again; set it to at least {longest_call_s:g}, or leave it unset"
            )
        return self.claim_lease_s

    def payee_for(self, endpoint_id: str, override: str | None = None) -> str:
        payee = override or self.payees.get(endpoint_id) or self.payee
        if not payee:
            raise ConfigError(
                f"no payee for endpoint {endpoint_id!r}: pass payee=..., or set PODSETTLE_PAYEE "
                "or PODSETTLE_PAYEES=endpoint=ag_worker"
            )
        return payee


class _Mapping(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of the process's."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return dict(self._environ)  # names as given: Settings matches them case-sensitively


# Each setting's environment variable, and back.
ENVIRONMENT: dict[str, str] = {
    name: str(field.validation_alias) for name, field in Settings.model_fields.items()
}
_FIELD_OF = {var: name for name, var in ENVIRONMENT.items()}
_POOL_FIELDS = tuple(name for name in Settings.model_fields if name.startswith("postgres_"))


def describe(error: ValidationError) -> str:
    """One line per problem, naming the setting (and its environment variable), never the value of a key."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a rule over several settings: its message names them
            lines.append(message)
            continue
        # A value from the environment is located by its variable, one from Python by its field.
        field = _FIELD_OF.get(str(problem["loc"][0]), str(problem["loc"][0]))
        name = ".".join([field, *(str(part) for part in problem["loc"][1:])])
        var = ENVIRONMENT.get(field)
        where = f"{name} ({var})" if var else name
        lines.append(f"{where}: {message}")
    return "; ".join(lines)
