"""The same worker without `refresh_worker`: module state carries over from job to job."""

import runpod

CALLS = []


def handler(job):
    CALLS.append(job["id"])
    return {"calls_in_this_worker": len(CALLS)}


runpod.serverless.start({"handler": handler})
