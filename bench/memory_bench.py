"""Peak memory of a whole `podsettle batch FILE` process, for a small and a large batch in one run.

Each batch of echo jobs is settled through the command line (SQLite store, `--json` to /dev/null)
against one sandbox served by a process of its own, its rate limits lifted; the sandbox's own memory
(it keeps every escrow) is not counted. Reported: the peak resident set of the batch process (its
`ru_maxrss`, read with `wait4`) for each size, and the ratio of the larger to the smaller: a batch
that streams its file and keeps nothing per job once the job rests is flat (aim: <= 1.1).

    .venv/bin/python bench/memory_bench.py                      # 2,000 and 20,000 jobs (~2 min)
    .venv/bin/python bench/memory_bench.py --jobs 10000 100000  # the issue's figure (~10 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, engine_env, figure, pick, sandbox_process


def _batch(folder: Path, info: dict[str, str], jobs: int) -> tuple[float, float]:
    """Peak RSS (MB) of one `podsettle batch` process settling `jobs` echo jobs, and its seconds."""
    inputs = folder / f"jobs-{jobs}.jsonl"
    with inputs.open("w") as out:
        for n in range(jobs):
            out.write(json.dumps({"n": n}) + "\n")
    store = f"sqlite:///{folder / f'store-{jobs}.db'}"
    args = ["batch", str(inputs), "--endpoint", "echo", "--budget", "0.10", "--json"]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podsettle.cli", *args],
            cwd=ROOT,
            env=engine_env(store, info),
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"podsettle batch failed ({proc.returncode}): {errors.read()[-2000:]!r}")
    return usage.ru_maxrss / 1024, elapsed  # KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs", type=int, nargs=2, default=[pick(2000, 500), pick(20_000, 5000)], metavar=("SMALL", "LARGE")
    )
    options = parser.parse_args()
    small, large = sorted(options.jobs)
    with sandbox_process() as info, tempfile.TemporaryDirectory(prefix="podsettle-bench-") as name:
        folder = Path(name)
        small_mb, small_s = _batch(folder, info, small)
        figure(f"memory.batch_{small}", small_mb, "MB", note=f"peak RSS; {small / small_s:.0f} jobs/s")
        large_mb, large_s = _batch(folder, info, large)
        figure(
            f"memory.batch_{large}",
            large_mb,
            "MB",
            ratio_to=large_mb / small_mb,
            baseline=f"batch_{small}",
            note=f"peak RSS; {large / large_s:.0f} jobs/s; {large // small}x the jobs",
        )


if __name__ == "__main__":
    main()
