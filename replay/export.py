"""A hash-chained export of the whole log to JSON Lines, and its audit without any database.

Every line is a JSON object with `n` (its line number, from 0) and `prev` (the sha256 of the previous
line's bytes), so changing, removing, inserting or moving any line breaks the chain right after it:

    {"kind":"header","format":"podsettle-export/1","application":"podsettle","n":0,"prev":"000…"}
    {"kind":"event","n":1,"position":1,"originator_id":"…","version":1,"topic":"…","state":"…","prev":"…"}
    … every `checkpoint_every` events:
    {"kind":"checkpoint","n":…,"events":1000,"last_position":1000,"running_hash":"…","prev":"…"}
    {"kind":"end","n":…,"events":…,"last_position":…,"running_hash":"…","prev":"…"}

`state` is the event's stored state as text (decrypted and decompressed when the store does that),
seal included, so the export can be checked event by event against the per-job chain as well.
A checkpoint's `running_hash` is the hash of the line before it: note one down elsewhere (a ticket,
a signed message) and the export can later be proven to start with exactly those events.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder

from podsettle.replay.audit import DEFAULT_MAX_OPEN, Auditor, AuditReport
from podsettle.replay.source import Decoder, Record, Seals, seals_of, store_pages
from podsettle.support.logs import get_logger

FORMAT = "podsettle-export/1"
GENESIS = "0" * 64
DEFAULT_CHECKPOINT_EVERY = 1_000
log = get_logger(__name__)


@dataclass(frozen=True)
class ExportSummary:
    path: str
    events: int
    last_position: int
    running_hash: str  # the hash of the end line's predecessor, as the end line records it

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "events": self.events,
            "last_position": self.last_position,
            "running_hash": self.running_hash,
        }


def _line(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()


def export(
    app: Application[Any],
    path: str | Path,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    seals: Seals | None = None,
) -> ExportSummary:
    """Write every event of `app`'s log, in log order, to `path` (JSON Lines, hash-chained)."""
    if checkpoint_every < 1:
        raise ValueError("checkpoint_every must be at least 1")
    seals = seals if seals is not None else seals_of(app)
    mapper = app.mapper
    decrypt = bool(mapper.cipher or mapper.compressor)
    plaintext = mapper.plaintext if decrypt and hasattr(mapper, "plaintext") else None
    if decrypt and plaintext is None:
        raise ValueError("the store encrypts or compresses events, and its mapper cannot give their text")
    stop = app.recorder.max_notification_id() or 0
    target = Path(path)
    prev = GENESIS
    n = 0
    events = 0
    last_position = 0
    with target.open("wb") as out:

        def write(fields: dict[str, Any]) -> None:
            nonlocal prev, n
            fields["n"] = n
            fields["prev"] = prev
            data = _line(fields)
            out.write(data + b"\n")
            prev = hashlib.sha256(data).hexdigest()
            n += 1

        write({"kind": "header", "format": FORMAT, "application": app.name, "sealed": seals is not None})
        for page in store_pages(app, stop=stop) if stop else ():
            for position, originator_id, version, topic, state in page:
                text = (plaintext(state) if plaintext is not None else state).decode("utf-8")
                write(
                    {
                        "kind": "event",
                        "position": position,
                        "originator_id": originator_id,
                        "version": version,
                        "topic": topic,
                        "state": text,
                    }
                )
                events += 1
                last_position = position
                if events % checkpoint_every == 0:
                    write(
                        {
                            "kind": "checkpoint",
                            "events": events,
                            "last_position": last_position,
                            "running_hash": prev,
                        }
                    )
        running = prev
        write({"kind": "end", "events": events, "last_position": last_position, "running_hash": running})
    log.info("log exported", path=str(target), events=events, last_position=last_position)
    return ExportSummary(str(target), events, last_position, running)


class _ExportHistory:
    """A job's earlier events, read again from the export (for a job the audit let go of)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.upto_line = 0

    def __call__(self, originator_id: str, through_version: int) -> list[Record]:
        needle = f'"originator_id":"{originator_id}"'.encode()
        found: list[Record] = []
        with self.path.open("rb") as source:
            for number, data in enumerate(source):
                if number >= self.upto_line:
                    break
                if needle not in data:
                    continue
                fields = json.loads(data)
                if fields.get("kind") == "event" and fields.get("version", 0) <= through_version:
                    found.append(
                        (
                            fields["position"],
                            originator_id,
                            fields["version"],
                            fields["topic"],
                            fields["state"].encode("utf-8"),
                        )
                    )
        found.sort(key=lambda record: record[2])
        return found


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as source:
        for number, data in enumerate(source):
            yield number, data.rstrip(b"\n")


def audit_export(
    path: str | Path,
    *,
    seals: Seals | None = None,
    transcoder: JSONTranscoder | None = None,
    quiescent: bool = True,
    max_open: int = DEFAULT_MAX_OPEN,
    settled: bool = False,
    now: Callable[[], datetime] | None = None,
) -> AuditReport:
    """Audit an export with no database: its line chain and checkpoints, then every event as the
    store audit would (contiguous job versions, the per-job seals when `seals` is given, and every
    invariant through the aggregate's own code; `settled` and `now` as for `audit`). Line numbers
    in findings count from 0 (the header).
    """
    source = Path(path)
    history = _ExportHistory(source)
    auditor = Auditor(
        source=f"export {source.name}",
        decoder=Decoder(transcoder),
        seals=seals,
        history=history,
        quiescent=quiescent,
        max_open=max_open,
        settled=settled,
        now=now,
    )
    started = time.perf_counter()
    prev_hash = GENESIS
    prev_n = -1
    events = 0
    # The first break of the chain, waiting for one more line to tell an inserted line from a changed one.
    suspect: tuple[int, str, int, int] | None = None
    chain_broken = False
    ended = False
    number = -1
    for number, data in _lines(source):
        auditor.line = number
        history.upto_line = number
        try:
            fields = json.loads(data)
            kind = fields["kind"]
            n = fields["n"]
            recorded_prev = fields["prev"]
        except (ValueError, KeyError, TypeError):
            auditor.find("export", "line is not an export record", line=number)
            chain_broken = True
            prev_hash = hashlib.sha256(data).hexdigest()
            continue
        if suspect is not None:
            _place_break(auditor, suspect, recorded_prev)
            suspect = None
        if ended:
            auditor.find("export", "lines after the end line", line=number)
        if not chain_broken and recorded_prev != prev_hash:
            chain_broken = True  # only the first break is placed; what follows cannot be placed reliably
            suspect = (number, prev_hash, n if isinstance(n, int) else -1, prev_n)
        elif not chain_broken and n != prev_n + 1:
            chain_broken = True
            auditor.find("export", "line numbers are not contiguous", f"{n} after {prev_n}", line=number)
        prev_n = n if isinstance(n, int) else prev_n
        prev_hash = hashlib.sha256(data).hexdigest()
        if number == 0:
            if kind != "header" or fields.get("format") != FORMAT:
                auditor.find("export", f"not a {FORMAT} file", line=0)
                break
            continue
        if kind == "event":
            events += 1
            try:
                record = (
                    int(fields["position"]),
                    str(fields["originator_id"]),
                    int(fields["version"]),
                    str(fields["topic"]),
                    str(fields["state"]).encode("utf-8"),
                )
            except (KeyError, TypeError, ValueError):
                auditor.find("export", "event line lacks a field", line=number)
                continue
            auditor.record(*record)
        elif kind in ("checkpoint", "end"):
            if fields.get("events") != events or fields.get("running_hash") != recorded_prev:
                auditor.find(
                    "export",
                    f"{kind} does not match the lines before it",
                    f"it counts {fields.get('events')} events, the file has {events} before it",
                    line=number,
                )
            ended = kind == "end"
        else:
            auditor.find("export", f"unknown line kind {kind!r}", line=number)
    if suspect is not None:
        _place_break(auditor, suspect, None)
    if not ended:
        auditor.find("export", "the export has no end line: it was cut short", line=number + 1)
    report = auditor.finish()
    report.elapsed_s = time.perf_counter() - started
    if seals is None:
        report.notes.append("per-job seals not checked (no seal format given)")
    return report


def _place_break(auditor: Auditor, suspect: tuple[int, str, int, int], next_prev: str | None) -> None:
    """Name the first bad line of a broken chain: line `number` does not record the hash of the line
    before it. If the line after it does, `number` was inserted; if line numbers skip, lines are
    missing (or were moved) before it; otherwise the line before it was changed."""
    number, hash_before, n, prev_n = suspect
    if next_prev is not None and next_prev == hash_before:
        auditor.find("export", "line was inserted: the line after it follows the line before it", line=number)
    elif n > prev_n + 1:
        auditor.find(
            "export",
            "line(s) missing or moved: this line does not follow the line before it",
            f"line number {n} follows {prev_n}",
            line=number,
        )
    else:
        auditor.find(
            "export",
            "line was changed: the line after it records a different hash",
            line=max(number - 1, 0),
        )
