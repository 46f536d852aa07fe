"""The worker of RunPod's quick start: a sync handler, `start` at module level."""

import runpod


def handler(job):
    job_input = job["input"]
    name = job_input.get("name", "World")
    extras = {key: job[key] for key in ("s3Config", "webhookV2") if key in job}
    return {"greeting": f"Hello, {name}!", **extras}


runpod.serverless.start({"handler": handler})
