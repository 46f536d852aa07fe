"""A worker that changes the process while imported: its arguments and its SIGINT handler."""

import signal
import sys

import runpod

sys.argv = [sys.argv[0], "--rp_serve_api"]
signal.signal(signal.SIGINT, signal.SIG_IGN)


def handler(job):
    return {"polite": False}


runpod.serverless.start({"handler": handler})
