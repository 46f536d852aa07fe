"""A sync handler that blocks (time.sleep, as model inference does)."""

import time

import runpod


def handler(job):
    time.sleep(float(job["input"].get("seconds", 1.0)))
    return {"slept": job["input"].get("seconds", 1.0)}


runpod.serverless.start({"handler": handler})
