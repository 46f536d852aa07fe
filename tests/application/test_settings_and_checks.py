"""Configuration (environment and flags) and the acceptance checks that gate a release."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from podsettle import Engine
from podsettle.domain import InvalidInput
from podsettle.domain import acceptance as checks
from podsettle.domain.rules import escrow_timeout_hours, latest_escrow_expiry
from podsettle.settings import ConfigError, Settings


def test_settings_from_the_environment_with_flags_overriding() -> None:
    env = {
        "PODSETTLE_STORE": "sqlite:///x.db",
        "PF_API_KEY": "pf_live_secret_value_123",
        "PODSETTLE_PAYEE": "ag_default",
        "PODSETTLE_PAYEES": "render=ag_render, train=ag_train",
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=100,release=50",
        "PODSETTLE_JOB_TIMEOUT_S": "120",
    }
    settings = Settings.from_env(env, job_timeout_s=300, payee=None)
    assert settings.job_timeout_s == 300  # the flag wins; a None flag is ignored
    assert settings.payee_for("render") == "ag_render"
    assert settings.payee_for("echo") == "ag_default"
    assert settings.payee_for("render", "ag_override") == "ag_override"
    assert settings.escrow_rate_limits == {"create": 100, "release": 50}
    assert "pf_live_secret_value_123" not in repr(settings) and "pf_live_secret_value_123" not in str(
        settings
    )


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"PODSETTLE_ESCROW_DIALECT": "v2"}, "PODSETTLE_ESCROW_DIALECT"),
        ({"PODSETTLE_JOB_TIMEOUT_S": "1"}, "PODSETTLE_JOB_TIMEOUT_S"),
        ({"PODSETTLE_PAYEES": "render"}, "PODSETTLE_PAYEES"),
        ({"PODSETTLE_ESCROW_URL": "ftp://x"}, "PODSETTLE_ESCROW_URL"),
        ({"PODSETTLE_ESCROW_RATE_LIMITS": "create=fast"}, "PODSETTLE_ESCROW_RATE_LIMITS"),
        ({"PODSETTLE_PAYER": "has spaces"}, "PODSETTLE_PAYER"),
        ({"PODSETTLE_RUNPOD_RUNSYNC_MS": "500"}, "PODSETTLE_RUNPOD_RUNSYNC_MS"),
        ({"PODSETTLE_RUNPOD_RUNSYNC_MS": "soon"}, "PODSETTLE_RUNPOD_RUNSYNC_MS"),
        ({"PODSETTLE_LOG_LEVEL": "loud"}, "PODSETTLE_LOG_LEVEL"),
        ({"PODSETTLE_CASINO_URL": "casino"}, "PODSETTLE_CASINO_URL"),
        ({"PODSETTLE_CONCURRENCY": "many"}, "PODSETTLE_CONCURRENCY"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Settings.from_env(env)


def test_construction_takes_only_the_values_given_and_from_env_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PODSETTLE_JOB_TIMEOUT_S", "120")
    monkeypatch.setenv("PF_API_KEY", "pf_live_from_the_environment")
    monkeypatch.setenv("podsettle_concurrency", "7")  # names are matched exactly
    monkeypatch.setenv("PODSETTLE_PAYEE", "   ")  # blank: as if unset
    assert Settings(store="memory").job_timeout_s == 600 and Settings().pf_api_key is None
    settings = Settings.from_env(store="memory")
    assert settings.job_timeout_s == 120 and settings.store == "memory"
    assert settings.pf_api_key is not None
    assert settings.pf_api_key.get_secret_value() == "pf_live_from_the_environment"
    assert settings.concurrency == 32 and settings.payee is None


def test_logging_views_operator_and_onboarding_services_are_settings_too() -> None:
    settings = Settings.from_env(
        {
            "PODSETTLE_LOG_LEVEL": " info ",
            "PODSETTLE_VIEWS": "views.db",
            "USER": "alice",
            "PODSETTLE_CASINO_URL": "http://127.0.0.1:1/",
            "PODSETTLE_FAUCET_URL": "https://faucet.test",
        }
    )
    assert settings.log_level == "INFO" and settings.views == "views.db" and settings.operator == "alice"
    assert settings.casino_url == "http://127.0.0.1:1" and settings.faucet_url == "https://faucet.test"
    defaults = Settings.from_env({})
    assert (defaults.log_level, defaults.views, defaults.operator) == ("WARNING", None, "operator")


def test_a_bad_value_from_python_names_the_setting_and_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"job_timeout_s \(PODSETTLE_JOB_TIMEOUT_S\)"):
        Settings.from_env({}, job_timeout_s=1)
    with pytest.raises(ConfigError, match=r"payees.render \(PODSETTLE_PAYEES\)"):
        Settings.from_env({}, payees={"render": 3})


def test_a_bad_key_is_named_without_its_value() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"PF_API_KEY": "pf_live_secret_value_123", "PODSETTLE_PAYEES": "x"})
    assert "pf_live_secret_value_123" not in str(caught.value)


def test_a_missing_payee_is_explained() -> None:
    with pytest.raises(ConfigError, match="PODSETTLE_PAYEE"):
        Settings.from_env({}).payee_for("echo")


PRODUCTION = {
    "PF_API_KEY": "pf_live_" + "k" * 40,
    "PODSETTLE_PAYER": "ag_payer",
    "RUNPOD_API_KEY": "runpod-key",
    "PODSETTLE_STORE": "memory",
}


def production(**more: str) -> Engine:
    return Engine.from_env(Settings.from_env({**PRODUCTION, **more}))


async def test_the_claim_lease_outlasts_the_longest_call_a_claim_covers() -> None:
    """A lease shorter than a start's longest wait would let a live engine's start be taken over
    and the job submitted twice: such a setting is refused, naming the variable and the minimum."""
    engine = production()  # the default: the longest call (65 s here), at least 60
    try:
        assert engine.processor.config.claim_lease_s == 65.0
    finally:
        await engine.aclose()
    longer = production(PODSETTLE_RUNPOD_RUNSYNC_MS="120000")
    try:
        assert longer.processor.config.claim_lease_s == 35.0 + 120 + 10  # a runsync waits 120 s
    finally:
        await longer.aclose()
    with pytest.raises(ConfigError) as refused:
        production(PODSETTLE_CLAIM_LEASE_S="2")
    message = str(refused.value)
    assert message.startswith("PODSETTLE_CLAIM_LEASE_S: 2 s is shorter than the longest call")
    assert "at least 65" in message
    chosen = production(PODSETTLE_CLAIM_LEASE_S="90")
    try:
        assert chosen.processor.config.claim_lease_s == 90.0
    finally:
        await chosen.aclose()


def test_the_escrow_outlives_the_job_by_the_release_margin() -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert escrow_timeout_hours(now + timedelta(minutes=10), now) == 2  # 10 min + 1 h margin -> 2 h
    assert escrow_timeout_hours(now + timedelta(hours=5), now) == 6
    assert escrow_timeout_hours(now, now) == 1
    assert escrow_timeout_hours(now + timedelta(days=60), now) == 720  # the service's most


def test_the_audit_s_bound_is_the_latest_an_escrow_the_engine_creates_can_expire() -> None:
    """The audit's bound on a sweep refund comes from the same rule as the escrow's hours: for any
    moment of creation up to the one recorded, the escrow expires by the bound, and it is tight."""
    deadline = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    for lead_s in (0, 1, 59, 600, 3599, 3600, 3601, 7200, 86_400, 40 * 86_400, 60 * 86_400):
        recorded = deadline - timedelta(seconds=lead_s)
        bound = latest_escrow_expiry(deadline, recorded)
        latest = recorded
        for earlier_s in (0, 1, 30, 1800, 3599):
            created = recorded - timedelta(seconds=earlier_s)
            expiry = created + timedelta(hours=escrow_timeout_hours(deadline, created))
            assert expiry <= bound
            latest = max(latest, expiry)
        assert bound - latest <= timedelta(hours=1)


@pytest.mark.parametrize(
    ("rule", "output", "passed", "words"),
    [
        (checks.non_empty(), {"x": 1}, True, "not empty"),
        (checks.non_empty(), {}, False, "no output"),
        (checks.non_empty(), None, False, "no output"),
        (checks.json_schema({"type": "object", "required": ["url"]}), {"url": "s3://a"}, True, "matches"),
        (
            checks.json_schema({"type": "object", "required": ["url"]}),
            {"path": "a"},
            False,
            "'url' is a required",
        ),
        (checks.metric_at_least("accuracy", "0.9"), {"accuracy": 0.93}, True, "meets"),
        (checks.metric_at_least("accuracy", "0.9"), {"accuracy": 0.85}, False, "below the required"),
        (checks.metric_at_least("accuracy", "0.9"), {"loss": 0.1}, False, "no numeric metric"),
        (checks.metric_at_least("accuracy", "0.9"), {"accuracy": True}, False, "no numeric metric"),
    ],
)
def test_builtin_checks(rule: dict, output: object, passed: bool, words: str) -> None:  # type: ignore[type-arg]
    result = checks.evaluate(rule, output)
    assert result.passed is passed and words in result.reason


def test_metrics_are_kept_exactly_and_custom_checks_run() -> None:
    result = checks.evaluate(checks.non_empty(), {"accuracy": 0.1, "epochs": 3, "name": "x"})
    assert result.metrics == {"accuracy": "0.1", "epochs": "3"}

    def crashes(output: object) -> bool:
        raise KeyError("score")

    verdict = checks.evaluate(checks.custom("strict"), {"x": 1}, {"strict": crashes})
    assert not verdict.passed and "raised KeyError" in verdict.reason
    unknown = checks.evaluate(checks.custom("missing"), {"x": 1}, {})
    assert not unknown.passed and "no acceptance check named" in unknown.reason


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"kind": "telepathy"}, "acceptance.kind"),
        ({"kind": "json_schema", "schema": "not a schema"}, "acceptance.schema"),
        ({"kind": "json_schema", "schema": {"type": 12}}, "acceptance.schema"),
        ({"kind": "metric", "metric": "accuracy", "min": "high"}, "acceptance.min"),
        ({"kind": "metric", "min": "0.5"}, "acceptance.metric"),
    ],
)
def test_bad_rules_name_the_field(rule: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidInput) as caught:
        checks.validate(rule)
    assert caught.value.field == field


async def test_streaming_endpoints_are_a_setting_off_by_default_and_reach_the_client() -> None:
    from podsettle.bootstrap import engine_from_settings

    assert Settings.from_env({}).runpod_streaming == frozenset()
    env = {
        "PODSETTLE_RUNPOD_STREAMING": " gen, llm ,",
        "PF_API_KEY": "pf_key",
        "RUNPOD_API_KEY": "rp_key",
        "PODSETTLE_PAYER": "ag_payer",
        "PODSETTLE_STORE": "memory",
    }
    settings = Settings.from_env(env)
    assert settings.runpod_streaming == frozenset({"gen", "llm"})
    engine = engine_from_settings(settings)
    try:
        assert engine.compute.streaming == frozenset({"gen", "llm"})
    finally:
        await engine.aclose()
    with pytest.raises(ConfigError, match="PODSETTLE_RUNPOD_STREAMING"):
        Settings.from_env({"PODSETTLE_RUNPOD_STREAMING": "gen,bad id"})
