"""A worker folder: the handler imports a sibling module; `start` under `if __name__ == "__main__"`."""

import runpod
from helpers import shout


def handler(job):
    return {"shout": shout(job["input"]["text"])}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
