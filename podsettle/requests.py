"""`JobRequest`: the one validated request a job is opened from.

The engine turns a caller's raw arguments into a `JobRequest` before anything is recorded or
funded: the input becomes its canonical JSON bytes (the digest is taken over them, and the compute
adapter sends them as they are), the budget and the bonus pool become Money, and everything the two
services are documented to refuse (an input over RunPod's body limit, an amount under the escrow's
minimum, a too-short escrow description) is refused here, naming the field. Code downstream of the
request is typed and never parses again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from podsettle.adapters.ports import EscrowCapabilities
from podsettle.domain import acceptance as checks
from podsettle.domain.digests import canonical_json, digest_bytes
from podsettle.domain.errors import InvalidInput
from podsettle.domain.escrow_job import check_id
from podsettle.domain.money import Money, fmt, to_money
from podsettle.domain.rules import is_referral_code

MIN_TIMEOUT_S = 5  # RunPod's smallest executionTimeout
MAX_TIMEOUT_S = 7 * 24 * 3600  # RunPod's largest executionTimeout and ttl
# The processor asks RunPod for a ttl up to this much past the deadline (processor.py's START step);
# the envelope of the largest body is measured with it.
TTL_SLACK_MS = 60_000


class BodyAndLimit(Protocol):
    def __call__(self, input_size: int, *, execution_timeout_ms: int, ttl_ms: int) -> tuple[int, int]: ...


@dataclass(frozen=True)
class JobRequest:
    """A job as the engine will open it: every value checked, amounts as Money, the input as the
    exact bytes that will be sent."""

    job_key: str
    endpoint_id: str
    input_bytes: bytes  # canonical JSON of the input: digested, and sent as they are
    input_digest: str
    payer: str
    payee: str
    budget: Money
    deadline: datetime
    batch_id: str | None = None
    referral: str | None = None
    acceptance: Mapping[str, Any] | None = None
    bonus_pool: Money | None = None
    # The JSON value of `input_bytes` (so that encoding it again gives the same bytes), kept with the
    # job to submit it again after a crash.
    job_input: Mapping[str, Any] | None = None
    dialect: str | None = None  # the escrow dialect whose fee rule the job's figures follow
    refund_method: str | None = None  # how a refund is asked for (escrow_job.REFUND_METHODS)
    # Metered pricing: paid min(budget, items delivered x price), the rest returned (None: the budget).
    price_per_item: Money | None = None
    retry_of: str | None = None  # the key of the refunded job this one runs again


def build_request(
    *,
    job_key: str,
    endpoint_id: str,
    job_input: object,
    budget: object,
    payer: str,
    payee: str,
    now: datetime,
    timeout_s: float,
    batch_id: str | None = None,
    referral: str | None = None,
    acceptance: Mapping[str, Any] | None = None,
    bonus_pool: object = None,
    known_checks: Mapping[str, object] | None = None,
    price_per_item: object = None,
    retry_of: str | None = None,
    body_and_limit: BodyAndLimit,
    escrow: EscrowCapabilities,
    description: str = "job",
    dialect: str | None = None,
    refund_method: str | None = None,
) -> JobRequest:
    """Check a caller's raw arguments and make them a `JobRequest`, or raise `InvalidInput` naming
    the field. `body_and_limit` is the compute gateway's (the body an input makes, and the largest
    it may send); `escrow` says what the escrow service refuses; `description` is the escrow's
    description as it will be sent."""
    check_id(job_key, "job_key")
    check_id(endpoint_id, "endpoint_id")
    if not isinstance(job_input, Mapping):
        raise InvalidInput("job_input", f"must be a JSON object, not {type(job_input).__name__}")
    if not 5 <= timeout_s <= MAX_TIMEOUT_S:
        raise InvalidInput("timeout_s", f"must be between {MIN_TIMEOUT_S} s and 7 days, got {timeout_s}")
    data = canonical_json(dict(job_input), "job_input")
    # The whole body counts, with the largest policy the processor may add (its values only shrink
    # as the deadline nears).
    timeout_ms = int(timeout_s * 1000)
    size, max_body_bytes = body_and_limit(
        len(data), execution_timeout_ms=timeout_ms + 2000, ttl_ms=timeout_ms + TTL_SLACK_MS
    )
    if size > max_body_bytes:
        raise InvalidInput(
            "job_input",
            f"makes a {size}-byte RunPod request, over the {max_body_bytes}-byte limit; nothing was recorded",
        )
    amount = to_money(budget, "budget", allow_zero=False)
    if amount < escrow.min_amount:
        raise InvalidInput(
            "budget", f"{fmt(amount)} is below the escrow's minimum of {fmt(escrow.min_amount)} USDC"
        )
    pool = None if bonus_pool is None else to_money(bonus_pool, "bonus_pool")
    price = None if price_per_item is None else to_money(price_per_item, "price_per_item", allow_zero=False)
    if price is not None and not escrow.partial_release:
        raise InvalidInput(
            "price_per_item",
            "this escrow service releases an escrow whole: a metered job needs one that can release "
            "part of it (the local ledger)",
        )
    check_id(retry_of, "retry_of", optional=True)
    if len(description.strip()) < escrow.min_description_chars:
        raise InvalidInput(
            "description",
            f"the escrow needs at least {escrow.min_description_chars} characters, got {description!r}",
        )
    if referral and escrow.referral_codes and not is_referral_code(referral):
        raise InvalidInput(
            "referral",
            f"{referral!r} is not a Purple Flea referral code (ref_ and 8 lowercase hex digits, as the "
            "referrer got it at registration); the service would ignore it and pay no referrer",
        )
    rule = checks.validate(acceptance) if acceptance is not None else None
    if rule is not None and rule["kind"] == "custom" and rule["name"] not in (known_checks or {}):
        raise InvalidInput(
            "acceptance.name", f"no check named {rule['name']!r} is registered with the engine"
        )
    return JobRequest(
        job_key=job_key,
        endpoint_id=endpoint_id,
        input_bytes=data,
        input_digest=digest_bytes(data),
        payer=payer,
        payee=payee,
        budget=amount,
        deadline=now + timedelta(seconds=timeout_s),
        batch_id=batch_id,
        referral=referral,
        acceptance=rule,
        bonus_pool=pool,
        job_input=json.loads(data),
        dialect=dialect,
        refund_method=refund_method,
        price_per_item=price,
        retry_of=retry_of,
    )
