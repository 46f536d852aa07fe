"""A worker reporting progress while it runs, as RunPod's docs show."""

import time

import runpod


def handler(job):
    steps = int(job["input"].get("steps", 3))
    pause = float(job["input"].get("pause", 0.2))
    for step in range(1, steps + 1):
        runpod.serverless.progress_update(job, f"step {step}/{steps}")
        time.sleep(pause)
    return {"steps": steps}


runpod.serverless.start({"handler": handler})
