"""A streaming worker without `return_aggregate_stream`: its parts are on /stream only."""

import runpod


def handler(job):
    for word in job["input"]["text"].split():
        yield {"token": word}


runpod.serverless.start({"handler": handler})
