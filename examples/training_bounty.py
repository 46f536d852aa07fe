"""Distributed training bounty: several pods race, the first to reach the target accuracy is paid.

    python examples/training_bounty.py [STORE_PATH]

Runs against the embedded sandbox (loopback HTTP, a funded payer, a worker), with its event store in
a temporary directory unless a path is given. How the money moves:

- `post_bounty` reserves the amount in the event log. No escrow exists yet: the hosted escrow fixes
  its payee when it is created, and the winner is not known until the race ends. With
  PODSETTLE_PAYER_BUDGET set, the engine refuses any job that would spend the reservation.
- The pods are plain RunPod jobs on the `train` endpoint (no escrow each: a loser is not paid). The
  first report of `accuracy >= target` (a progress value or the output) claims the bounty; a tie goes
  to the earliest report, then the smaller RunPod job id. The other pods are cancelled.
- The claim creates an escrow for the winner and releases it: the bounty is paid once, less the
  escrow's 1% fee. A 402 or 429 at claim time is retried until the bounty's deadline; after it the
  bounty waits in ATTENTION for an operator, still reserved.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from podsettle import Engine, Pod


async def main(store_path: str | None = None) -> dict[str, Any]:
    folder = None if store_path else tempfile.mkdtemp(prefix="bounty-")
    store = f"sqlite:///{store_path or Path(folder or '.') / 'bounty.db'}"
    async with Engine.sandbox(store) as engine:
        # 5 USDC for the first pod whose reported accuracy reaches 0.9 within ten minutes.
        bounty_id = await engine.post_bounty("train", "5.00", target="0.9", deadline_s=600)
        # Each pod trains with its own seed; the built-in `train` handler lands near its input's target.
        pods = [
            Pod("pod-a", {"target": 0.80, "seed": 1}),
            Pod("pod-b", {"target": 0.93, "seed": 2}),
            Pod("pod-c", {"target": 0.85, "seed": 3}),
        ]
        result = await engine.race_bounty(bounty_id, pods)

        print(f"bounty {result.bounty_key}: {result.state}")
        winner = result.winner
        if winner is not None:
            print(f"  won by {winner.pod} (accuracy {winner.value}), RunPod job {winner.runpod_job_id}")
            print(f"  paid {result.to_payee} USDC to {winner.payee}, escrow fee {result.fee} USDC")
            print(f"  cancelled, not paid: {len(result.losers)} pods")
        else:
            print(f"  nobody won: {result.reason}")
        ledger = engine.sandbox_server.ledger()  # the sandbox's own books, for the printout
        for account in ledger["accounts"]:
            print(f"  {account['account']:>24}: {account['balance']} USDC")
    return {"result": result, "ledger": ledger, "store": store}


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
