"""A cheap, unreliable render worker (spot GPUs) in RunPod's documented handler shape: it renders a
tile, or fails, the same way each time for the same tile (a seeded draw, so a demo is repeatable)."""

import hashlib
import json
import random

import runpod

FAIL_RATE = 0.35


def handler(job):
    tile = {"frame": job["input"]["frame"], "tile": job["input"]["tile"]}
    if random.Random(f"spot/{tile['frame']}/{tile['tile']}").random() < FAIL_RATE:
        raise RuntimeError(f"spot instance preempted while rendering {tile}")
    canonical = json.dumps(tile, sort_keys=True, separators=(",", ":"))
    return {**tile, "digest": hashlib.sha256(canonical.encode()).hexdigest()}


runpod.serverless.start({"handler": handler})
