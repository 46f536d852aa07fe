"""The sandbox of both services in a process of its own, its rate limits lifted (the `podsettle
sandbox` command has no option for them): prints one JSON line (its URLs, a funded payer and a
worker), serves until its stdin closes, then prints the escrow ledger and how many escrows each
job description got.

    python -m tests.postgres.sandbox_process
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from podsettle.sandbox.app import Sandbox
from podsettle.support.logs import configure_logging

LIFTED = {"create": 100_000, "complete": 100_000, "release": 100_000, "dispute": 100_000, "cancel": 100_000}


def main() -> None:
    configure_logging("WARNING")  # to stderr: stdout carries the two JSON lines
    with Sandbox(escrow_options={"rate_limits": LIFTED}) as sandbox:
        payer, worker = sandbox.create_agent("1000"), sandbox.create_agent("0")
        print(
            json.dumps(
                {
                    "url": sandbox.url,
                    "runpod_url": sandbox.runpod_url,
                    "payer": payer.agent_id,
                    "payer_key": payer.api_key,
                    "worker": worker.agent_id,
                }
            ),
            flush=True,
        )
        sys.stdin.read()
        ledger = sandbox.ledger()
        state = sandbox.app.escrow.state.escrow
        with state.ledger.transaction() as tx:
            rows = tx.execute("SELECT description FROM sandbox_escrows").fetchall()
        print(json.dumps({"ledger": ledger, "escrows": Counter(row[0] for row in rows)}), flush=True)


if __name__ == "__main__":
    main()
