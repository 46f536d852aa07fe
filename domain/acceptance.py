"""Acceptance checks: what makes an output worth paying for.

A check is described by plain data (stored in the job's `Opened` event, so the audit knows which
rule was applied) and evaluated on the output: pass or fail with a reason, plus any metric it read.
Built-ins: `non_empty`, `json_schema`, `metric` (a threshold). A custom check is a callable that
the engine registers under a name; the job records the name.

`evaluated_by` is a gate that is itself a paid job: a non-empty output is not released at once; the
engine opens an evaluator job on another endpoint (its own escrow, budget and fee, paid by the same
payer), waits for its score, and releases at or above the threshold, refunds below it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from podsettle.domain.errors import InvalidInput
from podsettle.domain.money import to_money

EVALUATED = "evaluated"


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str
    metrics: dict[str, str] = field(default_factory=dict)


CustomCheck = Callable[[Any], "CheckResult | bool"]


def non_empty() -> dict[str, Any]:
    return {"kind": "non_empty"}


def json_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    _schema_validator(schema)  # refuse a broken schema when the job is opened, not when it is paid
    return {"kind": "json_schema", "schema": dict(schema)}


def metric_at_least(name: str, minimum: object) -> dict[str, Any]:
    if not name:
        raise InvalidInput("acceptance.metric", "is required")
    return {"kind": "metric", "metric": name, "min": str(_number(minimum, "acceptance.min"))}


def custom(name: str) -> dict[str, Any]:
    if not name:
        raise InvalidInput("acceptance.name", "is required")
    return {"kind": "custom", "name": name}


def evaluated_by(endpoint: str, budget: object, threshold: object, metric: str = "score") -> dict[str, Any]:
    """Release only when an evaluator job on `endpoint` (paid `budget` out of its own escrow) scores
    the output at or above `threshold`, read from the evaluator output's numeric field `metric`."""
    if not endpoint:
        raise InvalidInput("acceptance.endpoint", "is required")
    if not metric:
        raise InvalidInput("acceptance.metric", "is required")
    price = to_money(budget, "acceptance.budget", allow_zero=False)
    return {
        "kind": EVALUATED,
        "endpoint": endpoint,
        "budget": str(price),
        "threshold": str(_number(threshold, "acceptance.threshold")),
        "metric": metric,
    }


def evaluator_key(job_key: str) -> str:
    """The evaluator job's key, derived from the evaluated job's: opening it again finds the same
    job, so an engine that restarts mid-evaluation never pays for a second evaluation."""
    return f"{job_key}:eval"


def evaluator_input(
    job_key: str, output_digest: str, metrics: Mapping[str, str], metric: str
) -> dict[str, Any]:
    """What the evaluator is sent: the candidate's key, the digest of its output and the metrics it
    reported, all from the log (so a restarted engine sends the same bytes), and the field to score."""
    return {"candidate": job_key, "output_digest": output_digest, "metrics": dict(metrics), "metric": metric}


def evaluator_acceptance(metric: str) -> dict[str, Any]:
    """The evaluator's own check: it is paid only for an output that carries the score as a number."""
    return json_schema({"type": "object", "required": [metric], "properties": {metric: {"type": "number"}}})


def score_text(value: object) -> str:
    """An evaluator's score as exact decimal text (a JSON float read by its shortest text)."""
    return str(_number(value, "score"))


def validate(rule: Mapping[str, Any]) -> dict[str, Any]:
    """Check that a rule given as data (e.g. from JSON) is one podsettle knows."""
    kind = rule.get("kind")
    if kind == "non_empty":
        return non_empty()
    if kind == "json_schema":
        schema = rule.get("schema")
        if not isinstance(schema, Mapping):
            raise InvalidInput("acceptance.schema", "must be a JSON object")
        return json_schema(schema)
    if kind == "metric":
        return metric_at_least(str(rule.get("metric") or ""), rule.get("min"))
    if kind == "custom":
        return custom(str(rule.get("name") or ""))
    if kind == EVALUATED:
        return evaluated_by(
            str(rule.get("endpoint") or ""),
            rule.get("budget"),
            rule.get("threshold"),
            str(rule.get("metric") or "score"),
        )
    raise InvalidInput(
        "acceptance.kind", f"{kind!r} is not one of non_empty, json_schema, metric, custom, {EVALUATED}"
    )


def evaluate(
    rule: Mapping[str, Any], output: Any, customs: Mapping[str, CustomCheck] | None = None
) -> CheckResult:
    """Apply a rule to an output. An empty output never passes, whatever the rule."""
    if _is_empty(output):
        return CheckResult(False, "the job returned no output")
    metrics = _metrics_of(output)
    kind = rule.get("kind", "non_empty")
    if kind == "non_empty":
        return CheckResult(True, "output is not empty", metrics)
    if kind == "json_schema":
        errors = sorted(_schema_validator(rule["schema"]).iter_errors(output), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "(root)"
            return CheckResult(
                False, f"output does not match the schema at {where}: {errors[0].message}", metrics
            )
        return CheckResult(True, "output matches the schema", metrics)
    if kind == "metric":
        name, minimum = rule["metric"], Decimal(rule["min"])
        if name not in metrics:
            return CheckResult(False, f"output has no numeric metric {name!r}", metrics)
        value = Decimal(metrics[name])
        if value < minimum:
            return CheckResult(False, f"{name} {value} is below the required {minimum}", metrics)
        return CheckResult(True, f"{name} {value} meets {minimum}", metrics)
    if kind == EVALUATED:
        # The output goes on to the evaluator: the gate that decides is its score (the processor).
        return CheckResult(True, f"output sent to the evaluator on {rule['endpoint']}", metrics)
    if kind == "custom":
        check = (customs or {}).get(rule["name"])
        if check is None:
            return CheckResult(False, f"no acceptance check named {rule['name']!r} is registered")
        try:
            verdict = check(output)
        except Exception as error:  # a user's check that crashes rejects the output, with the reason
            return CheckResult(
                False, f"check {rule['name']!r} raised {type(error).__name__}: {error}", metrics
            )
        if isinstance(verdict, CheckResult):
            return CheckResult(verdict.passed, verdict.reason, {**metrics, **verdict.metrics})
        return CheckResult(
            bool(verdict), f"check {rule['name']!r} {'passed' if verdict else 'failed'}", metrics
        )
    return CheckResult(False, f"unknown acceptance rule {kind!r}")


def _is_empty(output: Any) -> bool:
    return output is None or output == "" or output == {} or output == []


def _metrics_of(output: Any) -> dict[str, str]:
    """Top-level numbers of a dict output, as exact decimal strings (bool is not a metric)."""
    if not isinstance(output, Mapping):
        return {}
    found: dict[str, str] = {}
    for key, value in output.items():
        if isinstance(value, int | Decimal) and not isinstance(value, bool):
            found[str(key)] = str(value)
        elif isinstance(value, float):  # float-ok: a metric read from a JSON output, never money
            found[str(key)] = repr(value)  # the shortest text that reads back as the same number
    return found


def _number(value: object, field_name: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise InvalidInput(field_name, f"{value!r} is not a number") from None
    if not number.is_finite():
        raise InvalidInput(field_name, f"{value!r} is not a finite number")
    return number


def _schema_validator(schema: Mapping[str, Any]) -> Any:
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(dict(schema))
    except jsonschema.SchemaError as error:
        raise InvalidInput("acceptance.schema", f"is not a valid JSON schema: {error.message}") from None
    return cls(schema)
