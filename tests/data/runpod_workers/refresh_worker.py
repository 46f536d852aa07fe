"""A worker asking for a fresh worker after each job (`refresh_worker`): module state never carries over."""

import runpod

CALLS = []


def handler(job):
    CALLS.append(job["id"])
    return {"calls_in_this_worker": len(CALLS)}


runpod.serverless.start({"handler": handler, "refresh_worker": True})
