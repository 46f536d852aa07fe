"""Audit benchmark: audit rate against the library alone reading and decoding the same log, and peak
memory at two log sizes.

    .venv/bin/python bench/audit_bench.py                  # 100k and 1M events
    .venv/bin/python bench/audit_bench.py --sizes 20000    # quicker

For each size a SQLite log is generated (bulk saves of many jobs, their events interleaved as
concurrent jobs' are), then each figure is measured in a fresh subprocess on the same file, so
that peak RSS belongs to that measurement alone:
- library:       select_notifications + a plain eventsourcing Mapper's to_domain_event, with the
                 library's own JSONTranscoder (the application's transcodings registered), whatever
                 transcoder the application itself uses
- library+chain: select_notifications + the application's own mapper (decodes and checks seals)
- audit:         podsettle.replay.audit (seals, chains, versions, every invariant through the
                 aggregate's own code), no read model
- catch-up:      the live read model built from nothing (ReadModel.catch_up), for reference
- audit+views:   the audit with that read model, rebuilt into scratch views and compared
One line per figure, with ratios against the library in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES = ("library", "library+chain", "audit", "catch-up", "audit+views")


def generate(path: Path, events: int) -> int:
    """About `events` events: template jobs of each outcome cloned under new ids, interleaved."""
    from podsettle import Settlements
    from tests.histories import Plan, open_job, steps

    app = Settlements(f"sqlite:///{path}")
    templates = []
    for outcome in ("released", "bonus", "refunded", "by_service", "rejected", "attention_left"):
        job = open_job(Plan(f"template-{outcome}", outcome))
        for save in steps(Plan(f"template-{outcome}", outcome)):
            for command in save:
                command(job)
        templates.append(job.collect_events())
    written = 0
    group = 200  # jobs in flight together: their events interleave in the log
    n = 0
    while written < events:
        clones = []
        for _ in range(group):
            template = templates[n % len(templates)]
            n += 1
            job_id = uuid.uuid4()
            clone = []
            for event in template:
                copy = object.__new__(type(event))
                object.__setattr__(copy, "__dict__", {**event.__dict__, "originator_id": job_id})
                clone.append(copy)
            clones.append(clone)
        interleaved = [clone[i] for i in range(max(map(len, clones))) for clone in clones if i < len(clone)]
        app.save(*interleaved)
        written += len(interleaved)
    total = app.recorder.max_notification_id()
    app.close()
    return total


def measure(case: str, path: Path) -> dict[str, Any]:
    """One figure, in this (fresh) process."""
    from eventsourcing.persistence import JSONTranscoder, Mapper

    from podsettle import Settlements
    from podsettle.projections import ReadModel
    from podsettle.replay import audit

    app = Settlements(f"sqlite:///{path}")
    total = app.recorder.max_notification_id()
    model = None
    if case in ("catch-up", "audit+views"):
        model = ReadModel(app, str(path.with_suffix(".views.db")))
    started = time.perf_counter()
    if case == "catch-up":  # the live read model from nothing (measured apart: the audit starts caught up)
        ok = model is not None and model.catch_up() == total
    elif case.startswith("library"):
        if case == "library+chain":
            mapper = app.mapper
        else:  # eventsourcing alone: its Mapper and its JSONTranscoder
            transcoder = app.mapper.transcoder
            if type(transcoder) is not JSONTranscoder:
                transcoder = JSONTranscoder()
                app.register_transcodings(transcoder)
            mapper = Mapper(transcoder=transcoder)
        start, count = 1, 0
        while True:
            page = app.recorder.select_notifications(start, 2_000)
            if not page:
                break
            for notification in page:
                mapper.to_domain_event(notification)
            count += len(page)
            start = page[-1].id + 1
        ok = count == total
    else:
        report = audit(app, read_model=model)
        ok = report.ok and report.events == total
    elapsed = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "case": case,
        "events": total,
        "seconds": elapsed,
        "rate": total / elapsed,
        "peak_mb": peak_kb / 1024,
        "ok": ok,
    }


def run_case(case: str, path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, "--measure", case, str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--measure", nargs=2, metavar=("CASE", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
        sys.stdout.write(json.dumps(measure(args.measure[0], Path(args.measure[1]))) + "\n")
        return
    sys.path.insert(0, str(ROOT))
    out = sys.stdout.write
    peaks: dict[str, list[float]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="podsettle-audit-bench-") as folder:
        for size in args.sizes:
            path = Path(folder) / f"log-{size}.db"
            started = time.perf_counter()
            total = generate(path, size)
            seconds = time.perf_counter() - started
            out(f"[{total:>9,} events] generated in {seconds:.1f} s ({total / seconds:,.0f} events/s)\n")
            results = {case: run_case(case, path) for case in CASES}
            base = results["library"]["rate"]
            for case in CASES:
                r = results[case]
                peaks[case].append(r["peak_mb"])
                out(
                    f"[{total:>9,} events] {case:<14} {r['rate']:>9,.0f} events/s  "
                    f"({r['rate'] / base:4.2f}x library)  peak RSS {r['peak_mb']:6.1f} MB  "
                    f"{'ok' if r['ok'] else 'NOT OK'}\n"
                )
            path.unlink()
            path.with_suffix(".views.db").unlink(missing_ok=True)
    if len(args.sizes) > 1:
        for case in CASES:
            first, last = peaks[case][0], peaks[case][-1]
            out(
                f"peak RSS {case:<14} {args.sizes[0]:,} -> {args.sizes[-1]:,} events: "
                f"{first:.1f} MB -> {last:.1f} MB ({last / first:.2f}x)\n"
            )


if __name__ == "__main__":
    main()
