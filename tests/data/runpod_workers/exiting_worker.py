"""A worker that exits while being imported (a missing model file)."""

import sys

import runpod


def handler(job):
    return {"never": "reached"}


sys.exit(1)
runpod.serverless.start({"handler": handler})
