"""What the command line shows a person: rich tables and progress bars (stderr for progress, so
that stdout stays clean)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def _money(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"{value:.6f}"
    return "" if value is None else str(value)


@contextmanager
def progress(total: int, label: str, *, enabled: bool) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr while long work runs; a no-op for --json and non-terminals."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def print_job(result: Any) -> None:
    table = Table(title=f"job {result.job_id}", show_header=False)
    data = result.to_json()
    for name, value in data.items():
        if name in ("output", "progress", "evaluation"):
            continue
        table.add_row(name, "" if value is None else str(value))
    out.print(table)
    print_progress(data.get("progress") or [])
    print_evaluation(data.get("evaluation"))


def print_totals(totals: Any, *, title: str) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for name, value in totals.to_json().items():
        table.add_row(name, str(value))
    out.print(table)
    out.print(f"Totals: {totals.line()}")


def print_mapping(data: Mapping[str, Any], *, title: str) -> None:
    table = Table(title=title, show_header=False)
    for name, value in data.items():
        table.add_row(str(name), _money(value) if not isinstance(value, dict) else str(value))
    out.print(table)


def print_progress(progress: list[dict[str, Any]]) -> None:
    """The progress a running job reported, as a timeline (nothing when it reported none)."""
    if not progress:
        return
    table = Table(title="progress")
    for column in ("at", "progress"):
        table.add_column(column)
    for item in progress:
        shown = (
            item["value"]
            if item["value"] is not None
            else f"{item['size']} bytes, sha256 {item['digest'][:12]}"
        )
        table.add_row(item["at"] or "", shown)
    out.print(table)


def print_evaluation(evaluation: Mapping[str, Any] | None) -> None:
    """The evaluator's verdict on a job gated by `evaluated_by`: which job scored it, the score
    against the threshold, and the decision it led to (nothing for a job without an evaluator)."""
    if not evaluation:
        return
    table = Table(title="evaluation", show_header=False)
    decision = "released" if evaluation["passed"] else "refunded"
    table.add_row("evaluator job", str(evaluation["evaluator_job_id"]))
    table.add_row("score", "none" if evaluation["score"] is None else str(evaluation["score"]))
    table.add_row("threshold", str(evaluation["threshold"]))
    table.add_row("decision", f"{decision}: {evaluation['reason']}")
    out.print(table)


SHORT_ID = 8


def short_ids(ids: Iterable[str], length: int = SHORT_ID) -> dict[str, str]:
    """Each id's shortest prefix of at least `length` characters that no other id starts with (as
    `status` accepts it)."""
    items = sorted(set(ids))
    shown: dict[str, str] = {}
    for index, job_id in enumerate(items):
        size = length
        for neighbour in (
            items[index - 1] if index else "",
            items[index + 1] if index + 1 < len(items) else "",
        ):
            common = 0
            while common < min(len(job_id), len(neighbour)) and job_id[common] == neighbour[common]:
                common += 1
            size = max(size, common + 1)
        shown[job_id] = job_id[:size]
    return shown


def print_jobs(rows: Iterable[Any], all_ids: Iterable[str] | None = None) -> None:
    """One line per job at 80 columns: an id short enough to read and whole enough to copy (any
    command takes it), the status and the money; `--json` has every field and the full ids."""
    items = [row.to_json() for row in rows]
    if not items:
        out.print("no jobs")
        return
    prefixes = short_ids(all_ids if all_ids is not None else (item["job_id"] for item in items))
    rows_shown = [
        [
            prefixes.get(item["job_id"], item["job_id"]),
            item["status"],
            item["to_workers"],
            item["returned"],
            item["still_held"],
            item.get("batch_id") or "",
            item["endpoint_id"],
        ]
        for item in items
    ]
    # The budget is in `--json` and `status`: at 80 columns the batch id matters more (it is copied).
    headers = ["job", "status", "to_workers", "returned", "held", "batch", "endpoint"]
    table = Table(box=None, padding=(0, 1), pad_edge=False)
    for index, header in enumerate(headers):
        if header in ("endpoint", "batch"):
            # What gives way when the terminal is narrow: the names, never an id, a status or an amount.
            table.add_column(header, overflow="ellipsis", no_wrap=True, min_width=5)
        else:
            widest = max(len(header), *(len(row[index]) for row in rows_shown))
            table.add_column(header, justify="left" if index < 2 else "right", no_wrap=True, min_width=widest)
    for row in rows_shown:
        table.add_row(*row)
    out.print(table, soft_wrap=False)
    err.print("full ids and every field: --json; `podsettle status JOB` takes the short id", soft_wrap=True)


def print_earnings(rows: Iterable[Any]) -> None:
    items = list(rows)
    if not items:
        out.print("no earnings yet")
        return
    table = Table(title="worker earnings")
    data = [row.to_json() for row in items]
    keys = list(data[0])
    for key in keys:
        table.add_column(key, justify="right" if key != "payee" else "left")
    for item in data:
        table.add_row(*(str(item.get(key, "")) for key in keys))
    out.print(table)


def print_attention(listing: Mapping[str, Any]) -> None:
    if not listing["attention"] and not listing["differences"]:
        out.print("nothing needs attention")
        return
    if listing["attention"]:
        table = Table(title="jobs waiting for an operator")
        for column in ("job_id", "step", "reason", "known"):
            table.add_column(column)
        for item in listing["attention"]:
            known = {k: v for k, v in (item.get("attention") or {}).items() if k not in ("step", "reason")}
            table.add_row(
                item["job_id"], item["step"], item["reason"], ", ".join(f"{k}={v}" for k, v in known.items())
            )
        out.print(table)
    for difference in listing["differences"]:
        out.print(f"difference: {difference}")


def audit_report(report: Any) -> str:
    rendered: str = report.render()
    return rendered


def views_path(store_url: str, explicit: str | None = None) -> str | None:
    """Where a SQLite file of read models lives: `explicit` (the settings' views, $PODSETTLE_VIEWS)
    if given, else next to a SQLite store; None (in memory) for a store in memory, whose views go
    with its log (a PostgreSQL store keeps its views inside it: `open_views`). A file in the
    working directory would outlive the log it was made from, and a later store's would differ."""
    if explicit:
        return explicit
    if store_url.startswith("sqlite:///"):
        return f"{Path(store_url[len('sqlite:///') :]).expanduser()}.views"
    return None


def open_views(settlements: Any, store_url: str, explicit: str | None = None) -> Any:
    """The read models' views of a store: `explicit` (a SQLite file) if given, else the tables
    inside a PostgreSQL store, else the file beside a SQLite store."""
    if not explicit:
        from podsettle.projections.views_pg import postgres_views

        inside = postgres_views(settlements)
        if inside is not None:
            return inside
    return views_path(store_url, explicit)


def read_model(settlements: Any, store_url: str, views: str | None = None) -> Any:
    """The read model of a store, caught up with its log."""
    from podsettle.projections import ReadModel

    model = ReadModel(settlements, open_views(settlements, store_url, views))
    model.catch_up()
    return model
