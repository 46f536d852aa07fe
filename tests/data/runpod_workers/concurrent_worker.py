"""An async worker taking several jobs at once (`concurrency_modifier`)."""

import asyncio

import runpod


async def handler(job):
    await asyncio.sleep(float(job["input"].get("seconds", 0.3)))
    return {"done": job["input"].get("tag")}


def concurrency_modifier(current_concurrency):
    return 4


runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
