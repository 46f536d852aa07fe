"""The built-in demo endpoints: real RunPod worker handlers.

Each one is the function `runpod.serverless.start({"handler": ...})` would take: it receives the job
(`{"id": ..., "input": {...}}`) and returns the output. The sandbox's RunPod emulator and
`InProcessCompute` run them (and any user handler mounted by `module:function`) the way a worker does.
They are plain functions: nothing here imports the RunPod SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import random
from collections.abc import Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Any]

DEFAULT_FAIL_RATE = 0.3


def _input(job: dict[str, Any]) -> dict[str, Any]:
    value = job.get("input")
    if not isinstance(value, dict):
        raise ValueError("the job's input must be a JSON object")
    return value


def _number(job_input: dict[str, Any], name: str, default: float) -> float:
    value = job_input.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"input field {name!r} must be a number, got {value!r}")
    return float(value)


def echo(job: dict[str, Any]) -> Any:
    """output = input."""
    return _input(job)


async def sleep(job: dict[str, Any]) -> dict[str, Any]:
    """Sleeps `seconds` (default 1) and reports it; async, as long-running handlers often are."""
    seconds = _number(_input(job), "seconds", 1.0)
    if seconds < 0:
        raise ValueError("input field 'seconds' must not be negative")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def flaky(job: dict[str, Any]) -> dict[str, Any]:
    """Fails with probability `fail_rate` (default 0.3). The draw is seeded by the job id (or the
    input's `seed`), so the same job fails or succeeds the same way when a run is replayed."""
    job_input = _input(job)
    fail_rate = _number(job_input, "fail_rate", DEFAULT_FAIL_RATE)
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError("input field 'fail_rate' must be between 0 and 1")
    seed = job_input.get("seed", job.get("id", ""))
    draw = random.Random(f"flaky/{seed}").random()
    if draw < fail_rate:
        raise RuntimeError(f"flaky: simulated failure (draw {draw:.4f} < fail_rate {fail_rate})")
    return {"ok": True, "draw": round(draw, 6)}


def fail(job: dict[str, Any]) -> Any:
    """Always fails; the error text is the input's `message` when given."""
    message = _input(job).get("message") or "this endpoint always fails"
    raise RuntimeError(str(message))


def no_output(job: dict[str, Any]) -> None:
    """Returns nothing: RunPod reports the job COMPLETED without output."""
    _input(job)
    return None


def train(job: dict[str, Any]) -> dict[str, Any]:
    """A training run that reports its metric: `accuracy` lands near the input's `target`
    (default 0.9), deterministically for a given `seed` (default 0)."""
    job_input = _input(job)
    target = _number(job_input, "target", 0.9)
    if not 0.0 <= target <= 1.0:
        raise ValueError("input field 'target' must be between 0 and 1")
    seed = job_input.get("seed", 0)
    epochs = int(_number(job_input, "epochs", 3))
    rng = random.Random(f"train/{seed}")
    accuracy = min(1.0, max(0.0, target + rng.uniform(-0.05, 0.05)))
    loss = round(1.0 - accuracy + rng.uniform(0.0, 0.02), 6)
    return {"accuracy": round(accuracy, 6), "loss": loss, "epochs": epochs, "seed": seed}


def render(job: dict[str, Any]) -> dict[str, Any]:
    """Renders one tile of a frame: input `{"frame": n, "tile": ...}`, output the tile's digest."""
    job_input = _input(job)
    if "frame" not in job_input or "tile" not in job_input:
        raise ValueError("render needs input fields 'frame' and 'tile'")
    canonical = json.dumps(
        {"frame": job_input["frame"], "tile": job_input["tile"]}, sort_keys=True, separators=(",", ":")
    )
    return {
        "frame": job_input["frame"],
        "tile": job_input["tile"],
        "digest": hashlib.sha256(canonical.encode()).hexdigest(),
    }


BUILTIN_HANDLERS: dict[str, Handler] = {
    "echo": echo,
    "sleep": sleep,
    "flaky": flaky,
    "fail": fail,
    "no-output": no_output,
    "train": train,
    "render": render,
}


def resolve_handler(spec: str | Handler) -> Handler:
    """A handler from `"package.module:function"` (or a callable, returned as is)."""
    if callable(spec):
        return spec
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"a handler is named 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import the handler module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    handler: Handler = target
    return handler
