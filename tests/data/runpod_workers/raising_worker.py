"""A worker whose handler raises: FAILED with the error JSON a RunPod worker reports."""

import runpod


def handler(job):
    raise ValueError(f"cannot read {job['input'].get('path', 'the file')}")


runpod.serverless.start({"handler": handler})
