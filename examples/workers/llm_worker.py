"""A stand-in LLM worker in RunPod's documented streaming shape: a generator handler that yields one
part per token (no `return_aggregate_stream`, so the parts are delivered on `/stream` only).

Deploy a real model the same way; podsettle pays it per part that `/stream` delivered.
"""

import runpod


def handler(job):
    words = job["input"]["prompt"].split() or ["..."]
    for position in range(int(job["input"].get("max_tokens", 16))):
        yield {"token": words[position % len(words)]}  # a "model" that echoes its prompt


runpod.serverless.start({"handler": handler})
