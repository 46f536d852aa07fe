"""`start` under `if __name__ == "__main__"` with a handler not named `handler`, and its options."""

import runpod


def generate(job):
    yield from range(int(job["input"].get("n", 3)))


if __name__ == "__main__":
    runpod.serverless.start({"handler": generate, "return_aggregate_stream": True})
