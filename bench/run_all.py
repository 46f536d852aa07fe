"""Run every benchmark under bench/ several times, report the median of each figure, and write
BENCHMARKS.md at the repository root.

    .venv/bin/python bench/run_all.py                      # 3 runs of each script (make bench)
    PODSETTLE_BENCH_QUICK=1 .venv/bin/python bench/run_all.py   # one short run of each
    PODSETTLE_BENCH_RUNS=5 .venv/bin/python bench/run_all.py    # more runs
    PODSETTLE_BENCH_FULL=1 .venv/bin/python bench/run_all.py    # also the audit at 1M events (~7 min)
    .venv/bin/python bench/run_all.py --only lifecycle peer     # some scripts; --out FILE elsewhere
    .venv/bin/python bench/run_all.py --before f3df86d          # also an earlier revision, same run

With `--before REV` (`make bench BEFORE=REV`) the suite also runs that revision of the project (its
own bench scripts and code, extracted with `git archive`), each of its runs right after the matching
run of the working tree, and the report compares the two figure by figure: a before-and-after
measured in one run, on one machine, under the same load.

Each script runs as its own process (a fresh interpreter per run) and prints one line per figure,
`figure: <name> = <value> <unit> (ratio <r> vs <baseline>)`. The older scripts (escrow, compute,
audit) print prose lines: their figures are read with the patterns below, and anything else they
print is kept verbatim in the report. These machines are shared and noisy: every figure that has a
baseline is a ratio against it measured in the same run, and the median over the runs is reported.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import QUICK_ENV, ROOT, RUNS_ENV, Figure, machine, median, parse_figure, quick

FULL_ENV = "PODSETTLE_BENCH_FULL"

BENCH = Path(__file__).resolve().parent
DEFAULT_RUNS = 3


@dataclass(frozen=True)
class Script:
    name: str
    path: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    full_args: tuple[str, ...] | None = None  # PODSETTLE_BENCH_FULL=1: the larger sizes
    runs: int | None = None  # None: the suite's number of runs
    timeout_s: float = 900.0
    full_only: bool = False  # only with PODSETTLE_BENCH_FULL=1


# The figure scripts, in the order they run; any other *_bench.py found under bench/ runs after them.
SCRIPTS = [
    Script("lifecycle", "bench/lifecycle_bench.py"),
    Script("latency", "bench/latency_bench.py"),
    Script("peer", "bench/peer_bench.py"),
    Script("escrow", "bench/escrow_bench.py", ("--pairs", "500"), ("--pairs", "150", "--ledger-ops", "1000")),
    Script("compute", "bench/compute_bench.py", ("--jobs", "1000"), ("--jobs", "300")),
    Script("audit", "bench/audit_bench.py", ("--sizes", "100000"), ("--sizes", "20000")),
    # Peak memory at 1M events (issue 8): ~7 minutes a run, so one run, and only in full mode.
    Script("audit-1M", "bench/audit_bench.py", ("--sizes", "1000000"), runs=1, full_only=True),
]


def _number(text: str) -> float:
    return float(text.replace(",", ""))


Parser = Callable[[re.Match[str]], list[Figure]]
NUM = r"([-+0-9.,eE]+)"
# Patterns for the scripts that print prose instead of `figure:` lines.
PROSE: dict[str, list[tuple[re.Pattern[str], Parser]]] = {
    "escrow": [
        (
            re.compile(
                rf"^adapter over HTTP: {NUM} create\+release pairs/s.*GET /health: {NUM} req/s; ratio {NUM}"
            ),
            lambda m: [
                Figure(
                    "escrow.http_pairs", _number(m[1]), "pairs/s", _number(m[3]), "raw GET /health (requests)"
                ),
                Figure("escrow.http_health_baseline", _number(m[2]), "req/s"),
            ],
        ),
        (
            re.compile(rf"^ledger in process: {NUM} ops/s.*one-insert transactions: {NUM} tx/s; ratio {NUM}"),
            lambda m: [
                Figure(
                    "escrow.ledger_ops", _number(m[1]), "ops/s", _number(m[3]), "raw sqlite3 transactions"
                ),
                Figure("escrow.raw_sqlite3_tx", _number(m[2]), "tx/s"),
            ],
        ),
        (
            re.compile(
                rf"^LedgerEscrow in process: {NUM} create\+release pairs/s; ratio to the HTTP adapter {NUM}x"
            ),
            lambda m: [
                Figure("escrow.ledger_gateway_pairs", _number(m[1]), "pairs/s", _number(m[2]), "HTTP adapter")
            ],
        ),
    ],
    "compute": [
        (
            re.compile(rf"^adapter\+emulator: {NUM} jobs/s"),
            lambda m: [Figure("compute.http_jobs", _number(m[1]), "jobs/s")],
        ),
        (
            re.compile(rf"^http requests per job: {NUM}"),
            lambda m: [Figure("compute.requests_per_job", _number(m[1]), "requests")],
        ),
        (
            re.compile(rf"^baseline raw GET /health: {NUM} req/s; .* = {NUM} of the raw request rate"),
            lambda m: [
                Figure("compute.http_health_baseline", _number(m[1]), "req/s"),
                Figure("compute.request_rate_share", _number(m[2]), "", _number(m[2]), "raw GET /health"),
            ],
        ),
        (
            re.compile(rf"^inprocess compute: {NUM} jobs/s"),
            lambda m: [Figure("compute.inprocess_jobs", _number(m[1]), "jobs/s")],
        ),
    ],
    "audit": [
        (
            re.compile(
                rf"^\[\s*{NUM} events\] (\S+)\s+{NUM} events/s\s+\(\s*{NUM}x library\)\s+peak RSS\s+{NUM} MB"
            ),
            lambda m: _audit_figures(f"audit.{_size(m[1])}.{m[2].replace('library', 'eventsourcing')}", m),
        ),
    ],
}


PROSE["audit-1M"] = PROSE["audit"]


def _audit_figures(name: str, m: re.Match[str]) -> list[Figure]:
    """A case's rate (against eventsourcing alone) and its peak memory, under one name."""
    return [
        Figure(name, _number(m[3]), "events/s", _number(m[4]), "eventsourcing alone"),
        Figure(f"{name}.peak_rss", _number(m[5]), "MB"),
    ]


def _size(text: str) -> str:
    value = int(_number(text))
    return f"{round(value / 1000)}k" if value < 1_000_000 else f"{round(value / 1_000_000, 1):g}M"


@dataclass
class Outcome:
    script: Script
    runs: list[dict[str, Figure]] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # lines no pattern read (from the last run)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


# A script's own verdicts, kept in BENCHMARKS.md with its figures (its other "#" lines are notes on
# single figures, which the tables already carry).
KEPT_NOTES = ("# aim:", "# limit:")


def read_figures(script: Script, output: str) -> tuple[dict[str, Figure], list[str]]:
    figures: dict[str, Figure] = {}
    other: list[str] = []
    for line in output.splitlines():
        if not line.strip() or (line.startswith("#") and not line.startswith(KEPT_NOTES)):
            continue
        parsed = parse_figure(line)
        if parsed is not None:
            figures[parsed.name] = parsed
            continue
        for pattern, build in PROSE.get(script.name, []):
            match = pattern.search(line.strip())
            if match is not None:
                for item in build(match):
                    figures[item.name] = item
                break
        else:
            other.append(line.rstrip())
    return figures, other


def full() -> bool:
    return os.environ.get(FULL_ENV, "").strip().lower() not in ("", "0", "false", "no")


def script_args(script: Script, is_quick: bool) -> tuple[str, ...]:
    if is_quick:
        return script.quick_args
    if full() and script.full_args is not None:
        return script.full_args
    return script.args


def run_once(
    script: Script, root: Path, args: tuple[str, ...], label: str
) -> tuple[dict[str, Figure], list[str], str]:
    """One run of `script` from the project tree at `root`: its figures, other lines, and a failure."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    print(f"[{label}] {shlex.join(['python', script.path, *args])}", flush=True)
    try:
        done = subprocess.run(
            [sys.executable, str(root / script.path), *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=script.timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {}, [], f"timed out after {script.timeout_s:.0f} s"
    failure = ""
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        failure = f"exit {done.returncode}: " + " | ".join(map(_no_paths, tail))
    figures, other = read_figures(script, done.stdout)  # a failed run keeps what it printed
    for item in figures.values():
        print(f"    {item.name} = {item.value:g} {item.unit}", flush=True)
    return figures, [_no_paths(line) for line in other], failure


def run_script(
    script: Script, runs: int, is_quick: bool, before: Path | None = None
) -> tuple[Outcome, Outcome | None]:
    """Every run of `script`; with `before`, each followed by the same run of the earlier tree."""
    outcome = Outcome(script)
    # The earlier revision runs the same scripts, except the 1M-event audit (its aim is flat memory,
    # measured on this revision; ~7 minutes more per tree).
    earlier = (
        Outcome(script)
        if before is not None and (before / script.path).exists() and not script.full_only
        else None
    )
    args = script_args(script, is_quick)
    count = 1 if is_quick else (script.runs or runs)
    for run in range(count):
        for tree, result, label in ((ROOT, outcome, "now"), (before, earlier, "before")):
            if tree is None or result is None:
                continue
            started = time.perf_counter()
            figures, other, failure = run_once(script, tree, args, f"{script.name} {run + 1}/{count} {label}")
            result.seconds += time.perf_counter() - started
            if failure:
                result.failures.append(f"run {run + 1}: {failure}")
            if figures:
                result.runs.append(figures)
            result.other = other
    return outcome, earlier


def extract(revision: str) -> Path:
    """The project at `revision` in a temporary folder, importable as `podsettle` from its root."""
    folder = Path(tempfile.mkdtemp(prefix="podsettle-bench-before-"))
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--before {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    # The installed layout (DESIGN.md): the top-level folders are subpackages of `podsettle`.
    for name in ("domain", "adapters", "sandbox", "projections", "replay"):
        if (folder / name).is_dir() and not (folder / "podsettle" / name).exists():
            (folder / "podsettle" / name).symlink_to(folder / name, target_is_directory=True)
    return folder


PATH = re.compile(r"""(?:[A-Za-z]:)?(?:/[^\s/'"]+)+/([^\s/'"]+)""")


def _no_paths(text: str) -> str:
    """Error lines go into the committed report: file paths of this machine are cut to their names."""
    return PATH.sub(lambda m: f".../{m[1]}", text)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def summary(outcome: Outcome) -> list[tuple[str, float, str, float | None, str, list[float]]]:
    """Per figure: name, median value, unit, median ratio, baseline, every run's value."""
    names: list[str] = []
    for figures in outcome.runs:
        names.extend(name for name in figures if name not in names)
    rows = []
    for name in names:
        items = [figures[name] for figures in outcome.runs if name in figures]
        ratios = [item.ratio for item in items if item.ratio is not None]
        rows.append(
            (
                name,
                median([item.value for item in items]),
                items[-1].unit,
                median(ratios) if ratios else None,
                items[-1].baseline or "",
                [item.value for item in items],
            )
        )
    return rows


def aims(medians: dict[str, tuple[float, float | None]]) -> list[str]:
    """The issues' aims, against the medians."""
    lines = []

    def check(label: str, value: float | None, ok: bool | None, aim: str) -> None:
        state = "n/a" if ok is None else ("met" if ok else "**missed**")
        lines.append(f"| {label} | {_fmt(value)} | {aim} | {state} |")

    def get(name: str, use_ratio: bool = False) -> float | None:
        if name not in medians:
            return None
        value, ratio_value = medians[name]
        return ratio_value if use_ratio else value

    rate = get("lifecycle.engine")
    share = get("lifecycle.engine", True)
    speedup = get("peer.speedup")
    bound = get("peer.podsettle", True)
    check("lifecycle jobs/s (SQLite file)", rate, None if rate is None else rate >= 1000, ">= 1,000 jobs/s")
    check("lifecycle / raw sqlite3 rate", share, None if share is None else share >= 0.5, ">= 0.5")
    check(
        "podsettle speed-up over the seed pattern",
        speedup,
        None if speedup is None else speedup >= 10,
        ">= 10x",
    )
    check("podsettle time / latency bound", bound, None if bound is None else bound <= 2, "<= 2")
    audits = sorted(
        (name for name in medians if re.fullmatch(r"audit\.[\w.]+\.audit", name)),
        key=lambda name: medians[f"{name}.peak_rss"][0] if f"{name}.peak_rss" in medians else 0,
    )
    for name in audits:
        size = name.split(".")[1]
        check(f"audit events/s ({size} events)", get(name), _at_least(get(name), 150_000), ">= 150,000")
        check(f"audit / eventsourcing alone ({size})", get(name, True), _at_least(get(name, True), 1), ">= 1")
    peaks = [get(f"{name}.peak_rss") for name in audits]
    if len(peaks) > 1 and None not in peaks:
        growth = peaks[-1] / peaks[0]  # type: ignore[operator]
        check("audit peak memory, largest log / smallest", growth, growth <= 1.1, "<= 1.1 (flat)")
    # Issue 18: one PostgreSQL process against SQLite, and more processes against one (next to
    # what this machine gives processes that share nothing: a reference, not an aim).
    postgres = get("processes.postgres_1", True)
    slower = None if not postgres else 1 / postgres
    check("SQLite rate / one PostgreSQL process", slower, None if slower is None else slower <= 1.2, "<= 1.2")
    for name, label, aim in (
        ("postgres_2_vs_1", "2 processes / 1, echo jobs (CPU-bound)", True),
        ("postgres_4_vs_1", "4 processes / 1, echo jobs (CPU-bound)", True),
        ("independent_2_vs_1", "2 processes sharing nothing / 1 (reference)", False),
        ("independent_4_vs_1", "4 processes sharing nothing / 1 (reference)", False),
        ("slow_2_vs_1", "2 processes / 1, 0.1 s jobs (concurrency-bound)", True),
        ("slow_4_vs_1", "4 processes / 1, 0.1 s jobs (concurrency-bound)", True),
    ):
        value = get(f"processes.{name}")
        check(label, value, _at_least(value, 1) if aim else None, ">= 1" if aim else "this machine's ceiling")
    return lines


def _at_least(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def comparison(pairs: list[tuple[Outcome, Outcome | None]], revision: str) -> list[str]:
    """Before and after, figure by figure (the figures both revisions print)."""
    lines = [
        f"## Before and after (revision {revision} against this one, in the same run)",
        "",
        "Each run of a script on this revision was followed by the same run on the earlier one; medians of "
        "those runs. `after / before` above 1 means more of the figure (better for rates, worse for times "
        "and stalls).",
        "",
        "| figure | before | after | unit | after / before | before: ratio | after: ratio | vs |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for outcome, earlier in pairs:
        if earlier is None:
            continue
        old = {row[0]: row for row in summary(earlier)}
        for name, value, unit, ratio_value, baseline, _ in summary(outcome):
            if name not in old:
                continue
            _, old_value, _, old_ratio, _, _ = old[name]
            change = value / old_value if old_value else None
            lines.append(
                f"| {name} | {_fmt(old_value)} | {_fmt(value)} | {unit} | {_fmt(change)} | "
                f"{_fmt(old_ratio)} | {_fmt(ratio_value)} | {baseline} |"
            )
        for failure in earlier.failures:
            lines.append(f"| {outcome.script.name}: before failed: {failure} | | | | | | | |")
    return [*lines, ""]


def write_report(
    path: Path,
    outcomes: list[Outcome],
    runs: int,
    is_quick: bool,
    seconds: float,
    before: tuple[str, list[Outcome | None]] | None = None,
) -> None:
    info = machine()
    medians: dict[str, tuple[float, float | None]] = {}
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run_all.py`); do not edit by hand. Every figure is the median "
        f"of {'one quick run' if is_quick else f'{runs} runs (the audit at 1M events: one)'}; "
        "where a figure has a "
        "baseline, the ratio is against that baseline measured in the same run (these machines are shared "
        "and noisy: compare ratios rather than absolute rates).",
        "",
        "## Machine",
        "",
        f"- date: {info['date']}",
        f"- cores: {info['cores']} ({info['cpu']})",
        f"- memory: {info['memory_gb']} GB",
        f"- Python: {info['python']} ({info['implementation']}), SQLite {info['sqlite']}",
        f"- OS: {info['os']}",
        f"- suite time: {seconds:.0f} s{' (quick mode)' if is_quick else ' (full mode)' if full() else ''}",
        "",
    ]
    table: list[str] = []
    for outcome in outcomes:
        table += [f"### {outcome.script.name} (`{outcome.script.path}`)", ""]
        rows = summary(outcome)
        if rows:
            table += [
                "| figure | median | unit | ratio (median) | vs | runs |",
                "|---|---:|---|---:|---|---|",
            ]
            for name, value, unit, ratio_value, baseline, values in rows:
                medians[name] = (value, ratio_value)
                every = ", ".join(_fmt(v) for v in values)
                table.append(
                    f"| {name} | {_fmt(value)} | {unit} | {_fmt(ratio_value)} | {baseline} | {every} |"
                )
            table.append("")
        if outcome.other:
            table += ["Other output (last run):", "", "```", *outcome.other, "```", ""]
        for failure in outcome.failures:
            table.append(f"- failed: {failure}")
        if outcome.failures:
            table.append("")
    out += [
        "## Aims (issues 5, 6, 8 and 18)",
        "",
        "| aim | median | target | state |",
        "|---|---:|---|---|",
        *aims(medians),
        "",
        *(comparison(list(zip(outcomes, before[1], strict=True)), before[0]) if before else []),
        "## Figures",
        "",
        *table,
        "## Reproduce",
        "",
        "```",
        "make bench                                      # every script, 3 runs each, writes BENCHMARKS.md",
        "make bench BEFORE=<revision>                    # also that revision, run by run, compared",
        "PODSETTLE_BENCH_QUICK=1 .venv/bin/python bench/run_all.py   # one short run of each",
        "PODSETTLE_BENCH_FULL=1 .venv/bin/python bench/run_all.py    # also the audit at 1M events",
        *(
            f".venv/bin/python {o.script.path} {shlex.join(script_args(o.script, False))}".rstrip()
            for o in outcomes
        ),
        "```",
        "",
    ]
    path.write_text("\n".join(out), encoding="utf-8")


def discover(only: list[str] | None) -> list[Script]:
    scripts = [s for s in SCRIPTS if (ROOT / s.path).exists() and (full() or not s.full_only)]
    known = {s.path for s in SCRIPTS}
    for extra in sorted(BENCH.glob("*_bench.py")):
        relative = f"bench/{extra.name}"
        if relative not in known:
            scripts.append(Script(extra.stem.removesuffix("_bench"), relative))
    if only:
        scripts = [s for s in scripts if s.name in only]
    return scripts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get(RUNS_ENV) or DEFAULT_RUNS))
    parser.add_argument("--only", nargs="*", help="script names (lifecycle, latency, peer, escrow, ...)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--before", metavar="REVISION", help="also run this git revision, run by run")
    args = parser.parse_args(argv)
    is_quick = quick()
    if is_quick:
        os.environ[QUICK_ENV] = "1"
    started = time.perf_counter()
    earlier_tree = extract(args.before) if args.before else None
    try:
        pairs = [
            run_script(script, max(args.runs, 1), is_quick, earlier_tree) for script in discover(args.only)
        ]
    finally:
        if earlier_tree is not None:
            shutil.rmtree(earlier_tree, ignore_errors=True)
    outcomes = [outcome for outcome, _ in pairs]
    seconds = time.perf_counter() - started
    before = (args.before, [earlier for _, earlier in pairs]) if args.before else None
    write_report(args.out, outcomes, max(args.runs, 1), is_quick, seconds, before)
    print(f"wrote {args.out.name} ({seconds:.0f} s)")
    return 1 if any(o.failures for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
