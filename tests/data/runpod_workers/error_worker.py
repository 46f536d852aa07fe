"""A worker returning an error: the job ends FAILED with that text."""

import runpod


def handler(job):
    if job["input"].get("fail", True):
        return {"error": "the input image is too large"}
    return {"ok": True}


runpod.serverless.start({"handler": handler})
