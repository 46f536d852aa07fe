"""A streaming worker whose generator raises after its first part."""

import runpod


def handler(job):
    yield "first"
    raise RuntimeError("the GPU fell off the bus")


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
