"""User handlers the RunPod emulator mounts by `module:function` in the compute tests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

EXECUTIONS: Counter[str] = Counter()  # runs per job id
ORDER: list[str] = []  # the `tag` of each job, in the order the handler ran them


def count(job: dict[str, Any]) -> dict[str, Any]:
    EXECUTIONS[job["id"]] += 1
    ORDER.append(str(job["input"].get("tag", "")))
    return {"executions": EXECUTIONS[job["id"]], "input": job["input"]}


async def async_double(job: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"value": job["input"]["value"] * 2}


def tokens(job: dict[str, Any]) -> Iterator[str]:
    yield from job["input"]["text"].split()


async def async_tokens(job: dict[str, Any]) -> AsyncIterator[str]:
    for word in job["input"]["text"].split():
        await asyncio.sleep(0)
        yield word.upper()


def broken_stream(job: dict[str, Any]) -> Iterator[str]:
    yield "first"
    raise RuntimeError("the stream broke")


def error_object(job: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": 17, "message": "result upload failed"}}


def error_text(job: dict[str, Any]) -> dict[str, Any]:
    return {"error": "model weights not found"}


def not_json(job: dict[str, Any]) -> dict[str, Any]:
    return {"value": {1, 2}}


async def tagged_sleep(job: dict[str, Any]) -> dict[str, Any]:
    ORDER.append(str(job["input"].get("tag", "")))
    await asyncio.sleep(float(job["input"].get("seconds", 0)))
    return {"tag": job["input"].get("tag")}
