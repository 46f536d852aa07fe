"""What `podsettle batch` reads and writes, a job at a time: the JSON Lines file of job inputs, read
twice and never held (the first pass checks every line and counts the jobs before anything is
opened, the second feeds the engine as it opens chunks), and the `--json` document, written as the
jobs settle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import typer

from podsettle.cli.commands import fail


class JobsFile:
    """The job inputs of a JSON Lines file (one JSON object per line; blank lines are skipped).

    Made, it has read the whole file once, line by line, and refused it with one line naming the
    file and the line when a line is not a JSON object; `len` is the number of jobs. Iterating reads
    the file again, one line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        count = 0
        for _ in self._inputs():
            count += 1
        if not count:
            fail(f"{path}: holds no jobs (one JSON object per line)")
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._inputs()

    def line_of(self, index: int) -> int:
        """The line number of the job at `index` (from 0), for an error about that job."""
        for seen, (number, _) in enumerate(self._lines()):
            if seen == index:
                return number
        return 0

    def _lines(self) -> Iterator[tuple[int, str]]:
        try:
            with self.path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        yield number, line
        except FileNotFoundError:
            fail(f"{self.path}: no such file")
        except IsADirectoryError:
            fail(f"{self.path}: is a directory, not a file")
        except UnicodeDecodeError:
            fail(f"{self.path}: not UTF-8 text")

    def _inputs(self) -> Iterator[dict[str, Any]]:
        for number, line in self._lines():
            yield _json_object(line, f"{self.path} line {number}")


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        fail(f"{what}: not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(value, dict):
        fail(f"{what}: must be a JSON object, not {type(value).__name__}")
    return value


@dataclass
class JsonBatch:
    """The `--json` document of a batch, written as its jobs settle (one job per line in `jobs`,
    in the order they rest), closed with the totals; a batch stopped by a signal says so."""

    batch_id: str
    out: TextIO | None = None
    _started: bool = False
    _first: bool = True

    @property
    def begun(self) -> bool:
        return self._started

    def _write(self, text: str) -> None:
        typer.echo(text, nl=False, file=self.out)

    def job(self, data: dict[str, Any]) -> None:
        if not self._started:
            self._write(f'{{\n  "batch_id": {json.dumps(self.batch_id)},\n  "jobs": [\n')
            self._started = True
        self._write(("" if self._first else ",\n") + "    " + json.dumps(data, default=str))
        self._first = False

    def close(self, totals: dict[str, Any], *, stopped: str | None = None) -> None:
        if not self._started:
            self._write(f'{{\n  "batch_id": {json.dumps(self.batch_id)},\n  "jobs": [')
        else:
            self._write("\n  ")
        self._write("],\n")
        if stopped is not None:
            self._write(f'  "stopped": {json.dumps(stopped)},\n')
        self._write(f'  "totals": {json.dumps(totals, default=str)}\n}}\n')


@dataclass
class RestNotes:
    """What the results of a command leave to say on stderr, gathered as they come (nothing per
    job is kept): the warnings, and the refunds the escrow service still owes."""

    warnings: set[str] = field(default_factory=set)
    refunding: int = 0
    refund_method: str | None = None

    def add(self, result: Any) -> None:
        self.warnings.update(result.warnings)
        if result.state == "REFUNDING":
            self.refunding += 1
            if self.refund_method is None:
                self.refund_method = result.view.refund_method or "timeout"

    def explain(self) -> None:
        for warning in sorted(self.warnings):
            typer.echo(f"podsettle: warning: {warning}", err=True)
        if self.refunding:
            from podsettle.engine import refund_terms

            method = self.refund_method or "timeout"
            terms = refund_terms(method, cancel=method == "cancel")
            typer.echo(
                f"podsettle: {self.refunding} refund(s) still due: {terms}; `podsettle resume` records them",
                err=True,
            )
