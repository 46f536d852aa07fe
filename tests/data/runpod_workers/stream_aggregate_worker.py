"""An async streaming worker with `return_aggregate_stream`: the parts are also its output."""

import asyncio

import runpod


async def handler(job):
    for word in job["input"]["text"].split():
        await asyncio.sleep(0)
        yield word.upper()


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
