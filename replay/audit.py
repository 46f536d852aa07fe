"""The streaming audit: replay the whole log through the aggregate's own code, in constant memory.

For each record, in log order:
- the notification ids must follow each other (a gap is a removed event, a step back a moved one);
- the event must match its seal, and follow its job's previous event (version + 1, and the chain);
- EscrowJob events are decoded once and applied with the aggregate's own `@event` methods
  (`event.mutate(job)`), and the job's `violations()` are asked after every event that can break an
  invariant, so a violation is reported at the event that caused it;
- the running log digest is recomputed and compared with the read model's checkpoints.

A busy log is not a broken one: a funded job that waits on a service (its compute running, a
release in flight, a refund the escrow service's timeout sweep will make) is reported in flight,
not as a violation, until the bound its own log fixes (`waiting_on_service`); past that bound, or
with `settled=True` (every job must have settled), it is the quiescent rule's violation.

Memory: only jobs that are still open are kept (bounded by `max_open`), plus a bounded set of recently
finished ones (a bonus usually follows a release). A job met again after it was let go is rebuilt from
its own history (`history`); a finished job is projected into the scratch views when it is let go.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder

from podsettle.domain import EscrowJob, State
from podsettle.domain.bounty import BOUNTY_TOPIC_PREFIX, Bounty
from podsettle.domain.rules import latest_escrow_expiry
from podsettle.projections import Checkpoint, JobRow, Projector, ReadModel, ViewStore, is_job_topic
from podsettle.projections.apply import Applier, Creator, applier, creator, event_method
from podsettle.projections.views import VIEWS, row_from_record
from podsettle.replay.source import (
    DEFAULT_PAGE_SIZE,
    Decoder,
    Record,
    Seals,
    seals_of,
    store_history,
    store_pages,
)
from podsettle.support.logs import get_logger

log = get_logger(__name__)
ROW_FIELDS = tuple(f.name for f in fields(JobRow))
DEFAULT_MAX_OPEN = 5_000
DEFAULT_RECENT = 2_048
DEFAULT_MAX_FINDINGS = 1_000
# The published escrow service's timeout sweep runs every five minutes.
SWEEP_PERIOD = timedelta(minutes=5)
LEFT_IN_FLIGHT = "funded job left in "  # the quiescent rule's words (EscrowJob.violations)
Clock = Callable[[], datetime]
# Events after which an invariant can newly break (besides any order violation the apply recorded).
_CHECK_AFTER: frozenset[type] = frozenset(
    {
        EscrowJob.Funded,
        EscrowJob.FundingRejected,
        EscrowJob.Progressed,  # its bound (MAX_PROGRESS per job)
        EscrowJob.Completed,
        EscrowJob.Metered,  # the payout against the job's price per item
        EscrowJob.Evaluated,  # the verdict against the score and the job's threshold
        EscrowJob.Failed,
        EscrowJob.Released,
        EscrowJob.Refunded,
        EscrowJob.BonusRequested,
        EscrowJob.BonusFunded,
        EscrowJob.BonusAwarded,
    }
)


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the log: what kind, which rule, where (log position, job, version)."""

    kind: str  # "tamper" | "invariant" | "projection" | "export"
    rule: str
    detail: str = ""
    position: int | None = None
    job_id: str | None = None
    version: int | None = None
    line: int | None = None  # line of an export file

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rule": self.rule,
            "detail": self.detail,
            "position": self.position,
            "job_id": self.job_id,
            "version": self.version,
            "line": self.line,
        }

    def render(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.position is not None:
            where.append(f"position {self.position}")
        if self.job_id is not None:
            where.append(f"job {self.job_id}" + (f" v{self.version}" if self.version is not None else ""))
        place = ", ".join(where) or "log"
        return f"[{self.kind}] {place}: {self.rule}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class InFlight:
    """A funded job waiting on a service, within the bound its log fixes: busy, not broken."""

    job_id: str
    state: str
    waiting_for: str  # "compute" | "release" | "refund"
    until: datetime
    position: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "waiting_for": self.waiting_for,
            "until": self.until.isoformat(),
            "position": self.position,
        }

    def render(self) -> str:
        until = f"{self.until.astimezone(UTC):%Y-%m-%d %H:%M}Z"
        return f"job {self.job_id} {self.state}: waiting for its {self.waiting_for} until {until}"


def waiting_on_service(job: EscrowJob, funded_at: datetime | None) -> tuple[str, datetime] | None:
    """What a funded, unsettled job waits for and the latest moment its log allows for it, or None.

    Compute ends by the job's deadline. A release or a refund ends, at the latest, when the escrow's
    timeout sweep has run after the escrow expired: the escrow was created before it was recorded
    funded, for at most the hours the engine gives it (`escrow_timeout_hours`)."""
    state = job.state
    if state in (State.FUNDED, State.RUNNING):
        return "compute", job.deadline
    if state in (State.COMPLETED, State.RELEASING):
        waiting = "release"
    elif state in (State.FAILED, State.REFUNDING):
        waiting = "refund"
    else:
        return None
    created = funded_at or job.modified_on or job.created_on
    return waiting, latest_escrow_expiry(job.deadline, created) + SWEEP_PERIOD


@dataclass
class AuditReport:
    """What the audit found. `ok` is False on any finding: the CLI exits non-zero on it."""

    source: str
    events: int = 0
    jobs: int = 0
    first_position: int | None = None
    last_position: int | None = None
    findings: list[Finding] = field(default_factory=list)
    findings_left_out: int = 0
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    views_compared: bool = False
    in_flight: list[InFlight] = field(default_factory=list)
    settled_required: bool = False

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def events_per_second(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def first_bad(self) -> Finding | None:
        """The earliest finding in the log (by export line, else log position); tampering first,
        since a changed log explains the invariants it then breaks."""
        tampered = [f for f in self.findings if f.kind in ("tamper", "export")]
        located = [f for f in tampered or self.findings if f.line is not None or f.position is not None]
        if not located:
            candidates = tampered or self.findings
            return candidates[0] if candidates else None
        return min(located, key=lambda f: (f.line is None, f.line or 0, f.position or 0))

    def to_json(self) -> dict[str, Any]:
        first = self.first_bad
        return {
            "ok": self.ok,
            "source": self.source,
            "events": self.events,
            "jobs": self.jobs,
            "first_position": self.first_position,
            "last_position": self.last_position,
            "views_compared": self.views_compared,
            "first_bad": None if first is None else first.to_json(),
            "findings": [f.to_json() for f in self.findings],
            "findings_left_out": self.findings_left_out,
            "notes": list(self.notes),
            "settled_required": self.settled_required,
            "in_flight_count": len(self.in_flight),
            "in_flight": [job.to_json() for job in self.in_flight[:DEFAULT_MAX_FINDINGS]],
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def render(self) -> str:
        lines = [
            f"podsettle audit of {self.source}: {'OK' if self.ok else 'VIOLATIONS FOUND'}",
            f"  {self.events} events (positions {self.first_position}..{self.last_position}), "
            f"{self.jobs} jobs, {self.elapsed_s:.2f} s ({self.events_per_second:,.0f} events/s)",
            f"  read model compared with a rebuild: {'yes' if self.views_compared else 'no'}",
        ]
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.in_flight:
            lines.append(
                f"  {len(self.in_flight)} job(s) in flight, waiting on a service within the bound their log "
                "fixes (`replay --settled` counts them as violations):"
            )
            lines.extend(f"    {job.render()}" for job in self.in_flight[:20])
            if len(self.in_flight) > 20:
                lines.append(f"    ... and {len(self.in_flight) - 20} more")
        if self.findings:
            first = self.first_bad
            if first is not None:
                lines.append(f"  first bad: {first.render()}")
            lines.append(f"  {len(self.findings) + self.findings_left_out} finding(s):")
            lines.extend(f"    {f.render()}" for f in self.findings)
            if self.findings_left_out:
                lines.append(f"    ... and {self.findings_left_out} more")
        return "\n".join(lines) + "\n"


_EVENT_KEYS = frozenset({"originator_id", "originator_version", "timestamp", "class_version"})
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class _Fast:
    """How the audit applies the common event of a topic straight from its decoded fields: when the
    fields are exactly the parameters of its `@event` method (plus the timestamp), the method is
    called with them, as `mutate` would call it, and no event object is built."""

    __slots__ = ("check_after", "count", "func", "funded")

    def __init__(self, cls: type, func: Callable[..., None], names: frozenset[str]) -> None:
        self.func = func
        # Every parameter is required (see `_fast`): fields as many as the parameters and all named
        # by them are exactly them, and any other fields make both this call and `mutate` fail.
        self.count = len(names - {"self"})
        self.check_after = cls in _CHECK_AFTER
        self.funded = cls is EscrowJob.Funded


def _fast(decoder: Decoder, topic: str) -> _Fast | None:
    try:
        cls, class_version = decoder.event_class(topic)
    except Exception:
        return None
    if class_version != 1 or not isinstance(cls, type) or issubclass(cls, EscrowJob.Opened):
        return None
    found = event_method(cls)
    if found is None or found[1] & _EVENT_KEYS:
        return None
    parameters = list(inspect.signature(found[0]).parameters.values())
    if any(p.default is not p.empty or p.kind not in _NAMED for p in parameters[1:]):
        return None  # a default, *args or **kwargs: left to the general way
    return _Fast(cls, *found)


class _Stream:
    """What the audit keeps of one aggregate while it is in memory."""

    __slots__ = ("funded_at", "job", "position", "reported", "seal", "uuid", "version")

    def __init__(self, uuid: UUID, position: int) -> None:
        self.uuid = uuid
        self.version = 0
        self.seal: str | None = None
        self.job: EscrowJob | None = None
        self.position = position
        self.funded_at: datetime | None = None
        self.reported: set[str] | None = None


History = Callable[[str, int], list[Record]]


class Auditor:
    """Feeds records through the checks; `finish()` closes the log; `report` holds the findings."""

    def __init__(
        self,
        *,
        source: str,
        decoder: Decoder,
        seals: Seals | None,
        history: History | None,
        projector: Projector | None = None,
        live_checkpoints: dict[int, Checkpoint] | None = None,
        quiescent: bool = True,
        gaps_are_tampering: bool = True,
        max_open: int = DEFAULT_MAX_OPEN,
        recent: int = DEFAULT_RECENT,
        max_findings: int = DEFAULT_MAX_FINDINGS,
        decrypt: bool = False,
        settled: bool = False,
        now: Clock | None = None,
    ) -> None:
        self.report = AuditReport(source, settled_required=settled)
        self.settled = settled
        self.now = now or (lambda: datetime.now(UTC))
        self.decoder = decoder
        self.seals = seals
        self.history = history
        self.projector = projector
        self.live_checkpoints = live_checkpoints or {}
        self.checkpoints_seen: set[int] = set()
        self.quiescent = quiescent
        self.gaps_are_tampering = gaps_are_tampering
        self.max_open = max_open
        self.recent_size = recent
        self.max_findings = max_findings
        self.decrypt = decrypt
        self.last_position = 0
        self.current = 0  # the position of the record being read
        self.line: int | None = None
        self.open: dict[str, _Stream] = {}
        # Oldest first; an OrderedDict lets the oldest go in O(1) (a dict would scan its deleted slots).
        self.recent: OrderedDict[str, _Stream] = OrderedDict()
        # Jobs let go of while still open: what their quiescent check would say if nothing follows,
        # and what they wait for (if anything) until when.
        self.evicted: dict[str, tuple[int, list[str], tuple[str, datetime] | None, str]] = {}
        self._job_topics: dict[str, bool] = {}
        # Bounties (domain/bounty.py) are few: each is kept whole and checked after every event.
        self.bounties: dict[str, tuple[Bounty, set[str]]] = {}
        self._appliers: dict[type, Applier | None] = {}
        self._fasts: dict[str, _Fast | None] = {}
        self._creators: dict[type, Creator | None] = {}
        self.started = time.perf_counter()
        self._moment: datetime | None = None  # "now", read once when the log's end is checked

    # ------------------------------------------------------------------ findings

    def find(
        self,
        kind: str,
        rule: str,
        detail: str = "",
        *,
        position: int | None = None,
        job_id: str | None = None,
        version: int | None = None,
        line: int | None = None,
    ) -> None:
        report = self.report
        if len(report.findings) >= self.max_findings:
            report.findings_left_out += 1
            return
        if line is None and position is not None and position == self.current:
            line = self.line  # a finding at the record being read: name its export line too
        report.findings.append(Finding(kind, rule, detail, position, job_id, version, line))

    # ------------------------------------------------------------------ the log

    def feed(self, page: Iterable[Record]) -> None:
        """Audit a page of records: `record` for each, with the common case taken in one loop.

        The common case is a record that follows the one before it in the log and the previous
        event of a job the audit holds, with a seal that matches and names that event's seal. Its
        checks are made first, with no effect; any record that fails one of them, or that starts a
        job, goes through `record`, which makes the same checks again and reports what fails."""
        seals = self.seals
        if seals is None or self.decrypt or self.line is not None:
            for record in page:
                self.record(*record)
            return
        slow = self.record
        unseal = seals.unseal
        open_get = self.open.get
        report = self.report
        projector = self.projector
        checkpoints = self.live_checkpoints
        job_topics = self._job_topics
        apply = self._apply
        fasts = self._fasts
        decode_fields = self.decoder.fields
        genesis = seals.genesis
        recent = self.recent
        # The report's counters and the last position are kept here for the page and written back
        # before anything else reads them (`record`, and when the page ends).
        last = self.last_position
        counted = 0
        current: int | None = None  # the position of the last record, when it took this loop
        for position, originator_id, version, topic, state in page:
            stream = open_get(originator_id)
            if position != last + 1 or report.first_position is None:
                self.last_position = last
                slow(position, originator_id, version, topic, state)
                last, current = self.last_position, None
                continue
            if stream is None:  # a job's first event (a job met again goes through `record`)
                if version != 1 or originator_id in recent:
                    self.last_position = last
                    slow(position, originator_id, version, topic, state)
                    last, current = self.last_position, None
                    continue
                expected: str | None = genesis
            elif stream.version + 1 != version:
                self.last_position = last
                slow(position, originator_id, version, topic, state)
                last, current = self.last_position, None
                continue
            else:
                expected = stream.seal
            unsealed = unseal(originator_id, version, topic, state)
            if unsealed is None or not unsealed[2] or unsealed[0] != expected:
                self.last_position = last
                slow(position, originator_id, version, topic, state)
                last, current = self.last_position, None
                continue
            # What `record` does for such a record, in the same order.
            counted += 1
            last = current = position
            if projector is not None:
                projector.observe(position, originator_id, version, topic, state)
                checkpoint = checkpoints.get(position)
                if checkpoint is not None:
                    self._compare_checkpoint(checkpoint, projector)
            if stream is None:
                stream = self.open[originator_id] = _Stream(UUID(originator_id), position)
                self._bound_open()
            stream.version = version
            stream.seal = unsealed[1]
            stream.position = position
            job_topic = job_topics.get(topic)
            if job_topic is None:
                job_topic = job_topics[topic] = is_job_topic(topic)
            if not job_topic:
                if topic.startswith(BOUNTY_TOPIC_PREFIX):
                    self._bounty(topic, originator_id, version, state, position)
                self._rest(originator_id, stream)
                continue
            job = stream.job
            try:
                fast = fasts[topic]
            except KeyError:
                fast = fasts[topic] = _fast(self.decoder, topic)
            if job is None or fast is None:
                apply(stream, topic, version, state, position, originator_id)
                continue
            try:
                fields = decode_fields(state)
                timestamp = fields.pop("timestamp")
            except Exception:
                apply(stream, topic, version, state, position, originator_id)  # reports what is wrong
                continue
            if len(fields) != fast.count:
                apply(stream, topic, version, state, position, originator_id)  # the general way
                continue
            # `_apply` for this event, with the fields as `mutate` would pass them.
            before = len(job.order_violations)
            job.version = version - 1
            try:
                fast.func(job, **fields)
            except TypeError:  # fields that are not the method's parameters: the general way reports it
                apply(stream, topic, version, state, position, originator_id)
                continue
            job.version = version
            job.modified_on = timestamp
            if fast.funded and stream.funded_at is None:
                stream.funded_at = timestamp
            if fast.check_after or len(job.order_violations) != before:
                self._check(stream, originator_id, position)
            if job.rests:
                self._rest(originator_id, stream)
        report.events += counted
        self.last_position = report.last_position = last
        if current is not None:
            self.current = current

    def record(self, position: int, originator_id: str, version: int, topic: str, state: bytes) -> None:
        report = self.report
        report.events += 1
        self.current = position
        if report.first_position is None:
            report.first_position = position
        expected = self.last_position + 1
        if position != expected:
            if position <= self.last_position:
                self.find(
                    "tamper",
                    "notification ids go backwards: an event was moved or inserted",
                    f"position {position} after {self.last_position}",
                    position=position,
                    job_id=originator_id,
                    version=version,
                )
            elif self.gaps_are_tampering:
                missing = f"{expected}" if position == expected + 1 else f"{expected}..{position - 1}"
                self.find(
                    "tamper",
                    "notification ids skip: events were removed from the log",
                    f"missing position(s) {missing}",
                    position=expected,
                    line=self.line,
                )
            else:
                report.notes.append(f"positions {expected}..{position - 1} are not in the log (store gap)")
        self.last_position = max(position, self.last_position)
        report.last_position = self.last_position

        projector = self.projector
        if projector is not None:
            projector.observe(position, originator_id, version, topic, state)
            checkpoint = self.live_checkpoints.get(position)
            if checkpoint is not None:
                self._compare_checkpoint(checkpoint, projector)

        seals = self.seals
        prev: str | None = None
        seal: str | None = None
        if seals is not None:
            body = seals.plaintext(state) if self.decrypt else state
            unsealed = seals.unseal(originator_id, version, topic, body)
            if unsealed is None:
                self.find(
                    "tamper", "event is not sealed", position=position, job_id=originator_id, version=version
                )
            else:
                prev, seal, intact = unsealed
                if not intact:
                    self.find(
                        "tamper",
                        "event was changed: it does not match its seal",
                        position=position,
                        job_id=originator_id,
                        version=version,
                    )
        else:
            body = state

        stream = self._stream(originator_id, version, position)
        if stream.version + 1 != version:
            self.find(
                "tamper",
                "job's versions are not contiguous: an event was removed, inserted or moved",
                f"expected v{stream.version + 1}, found v{version}",
                position=position,
                job_id=originator_id,
                version=version,
            )
        elif prev is not None:
            expected_prev = stream.seal if version > 1 else seals.genesis if seals else None
            if expected_prev is not None and prev != expected_prev:
                self.find(
                    "tamper",
                    "chain broken: the event does not follow its job's previous event",
                    position=position,
                    job_id=originator_id,
                    version=version,
                )
        stream.version = version
        stream.seal = seal
        stream.position = position
        job_topic = self._job_topics.get(topic)
        if job_topic is None:
            job_topic = self._job_topics[topic] = is_job_topic(topic)
        if job_topic:
            self._apply(stream, topic, version, body, position, originator_id)
        else:
            if topic.startswith(BOUNTY_TOPIC_PREFIX):
                self._bounty(topic, originator_id, version, body, position)
            self._rest(originator_id, stream)  # other aggregates (a job's input): only chained

    def _stream(self, originator_id: str, version: int, position: int) -> _Stream:
        stream = self.open.get(originator_id)
        if stream is not None:
            return stream
        stream = self.recent.pop(originator_id, None)
        if stream is not None:
            self.open[originator_id] = stream
            self._bound_open()
            return stream
        stream = _Stream(UUID(originator_id), position)
        if version > 1:
            self._revive(stream, originator_id, version - 1)
        self.open[originator_id] = stream
        self._bound_open()
        return stream

    def _revive(self, stream: _Stream, originator_id: str, through_version: int) -> None:
        """Rebuild a job the audit let go of (or whose start it never saw) from its own history."""
        self.evicted.pop(originator_id, None)
        if self.history is None:
            return
        for _, _, version, topic, state in self.history(originator_id, through_version):
            if version != stream.version + 1:
                break  # a hole in the history: reported when the event after it arrives
            body = self.seals.plaintext(state) if self.seals is not None and self.decrypt else state
            unsealed = self.seals.unseal(originator_id, version, topic, body) if self.seals else None
            stream.seal = None if unsealed is None else unsealed[1]
            stream.version = version
            if is_job_topic(topic):
                self._apply(stream, topic, version, body, None, originator_id, quiet=True)
        job = stream.job
        if job is not None:
            # Whatever this job broke was reported when the audit first met it.
            stream.reported = set(job.violations())

    def _apply(
        self,
        stream: _Stream,
        topic: str,
        version: int,
        body: bytes,
        position: int | None,
        originator_id: str,
        *,
        quiet: bool = False,
    ) -> None:
        try:
            event = self.decoder.decode(topic, stream.uuid, version, body)
        except Exception as error:
            if not quiet:
                self.find(
                    "tamper",
                    "event cannot be decoded",
                    str(error)[:200],
                    position=position,
                    job_id=originator_id,
                    version=version,
                )
            return
        job = stream.job
        if job is None:
            if not isinstance(event, EscrowJob.Opened):
                if not quiet:
                    self.find(
                        "tamper",
                        "job's history does not start with Opened",
                        type(event).__name__,
                        position=position,
                        job_id=originator_id,
                        version=version,
                    )
                return
            kind = type(event)
            try:
                create = self._creators[kind]
            except KeyError:
                create = self._creators[kind] = creator(kind)
            try:
                job = event.mutate(None) if create is None else create(event)
            except Exception as error:  # the stored fields do not fit the event's class
                self._misfit(error, quiet, position, originator_id, version)
                return
            stream.job = job
            if not quiet:
                self.report.jobs += 1
        else:
            if isinstance(event, EscrowJob.Opened):
                if not quiet:
                    self.find(
                        "tamper", "job opened twice", position=position, job_id=originator_id, version=version
                    )
                return
            before = len(job.order_violations)
            job.version = version - 1  # continue past a reported hole, so the rest is still checked
            kind = type(event)
            try:
                apply = self._appliers[kind]
            except KeyError:
                apply = self._appliers[kind] = applier(kind)
            try:
                if apply is None:
                    event.mutate(job)
                else:
                    apply(job, event)
            except Exception as error:  # the stored fields do not fit the event's class
                self._misfit(error, quiet, position, originator_id, version)
                return
            if stream.funded_at is None and kind is EscrowJob.Funded:
                stream.funded_at = event.timestamp
            if quiet:
                return
            if kind in _CHECK_AFTER or len(job.order_violations) != before:
                self._check(stream, originator_id, position)
        if job is not None and not quiet and job.rests:
            self._rest(originator_id, stream)

    def _bounty(self, topic: str, originator_id: str, version: int, body: bytes, position: int) -> None:
        """Apply a bounty's event with the aggregate's own code and report what it breaks."""
        try:
            event: Any = self.decoder.decode(topic, UUID(originator_id), version, body)
        except Exception as error:
            self.find(
                "tamper",
                "event cannot be decoded",
                str(error)[:200],
                position=position,
                job_id=originator_id,
                version=version,
            )
            return
        known = self.bounties.get(originator_id)
        try:
            if isinstance(event, Bounty.Posted):
                if known is not None:
                    self.find("tamper", "bounty posted twice", position=position, job_id=originator_id)
                    return
                created: Any = event.mutate(None)  # the library types it loosely: a Bounty
                known = self.bounties[originator_id] = (created, set())
            elif known is None:
                self.find(
                    "tamper",
                    "bounty's history does not start with Posted",
                    type(event).__name__,
                    position=position,
                    job_id=originator_id,
                    version=version,
                )
                return
            else:
                known[0].version = version - 1
                event.mutate(known[0])
        except Exception as error:
            self._misfit(error, False, position, originator_id, version)
            return
        self._check_bounty(originator_id, position)

    def _check_bounty(self, originator_id: str, position: int | None, *, quiescent: bool = False) -> None:
        bounty, reported = self.bounties[originator_id]
        for rule in bounty.violations(quiescent=quiescent):
            if rule not in reported:
                reported.add(rule)
                self.find("invariant", rule, position=position, job_id=originator_id, version=bounty.version)

    def _misfit(
        self, error: Exception, quiet: bool, position: int | None, originator_id: str, version: int
    ) -> None:
        if not quiet:
            self.find(
                "tamper",
                "event does not fit its class",
                f"{type(error).__name__}: {str(error)[:200]}",
                position=position,
                job_id=originator_id,
                version=version,
            )

    def _rest(self, originator_id: str, stream: _Stream) -> None:
        """A job at rest (finished, or parked for an operator: no rule of a quiescent log can still
        flag it), or another aggregate, moves to the bounded set of recent ones."""
        self.open.pop(originator_id, None)
        recent = self.recent
        recent[originator_id] = stream
        if len(recent) > self.recent_size:
            self._project(recent.popitem(last=False)[1])

    def _check(
        self, stream: _Stream, originator_id: str, position: int | None, *, quiescent: bool = False
    ) -> None:
        job = stream.job
        if job is None:
            return
        rules = job.violations(quiescent=quiescent)
        if quiescent and self._busy(
            originator_id, job.state, waiting_on_service(job, stream.funded_at), position
        ):
            rules = [rule for rule in rules if not rule.startswith(LEFT_IN_FLIGHT)]
        for rule in rules:
            reported = stream.reported
            if reported is None:
                reported = stream.reported = set()
            if rule in reported:
                continue
            reported.add(rule)
            self.find("invariant", rule, position=position, job_id=originator_id, version=job.version)

    def _bound_open(self) -> None:
        while len(self.open) > self.max_open:
            self._let_go_of_open(next(iter(self.open)))

    def _let_go_of_open(self, originator_id: str) -> None:
        stream = self.open.pop(originator_id)
        job = stream.job
        if job is None:
            return
        self._check(stream, originator_id, stream.position)
        if self.quiescent:
            now = set(job.violations())
            later = [rule for rule in job.violations(quiescent=True) if rule not in now]
            if later:
                waiting = waiting_on_service(job, stream.funded_at)
                self.evicted[originator_id] = (stream.position, later, waiting, str(job.state))
        self._project(stream)

    def _busy(
        self, originator_id: str, state: str, waiting: tuple[str, datetime] | None, position: int | None
    ) -> bool:
        """Whether a job the quiescent rule flags is only busy: it waits on a service and its bound
        has not passed (then it is reported in flight), unless every job must have settled."""
        if waiting is None or self.settled:
            return False
        what, until = waiting
        if self._moment is None:
            self._moment = self.now()
        if self._moment > until:
            return False
        self.report.in_flight.append(InFlight(originator_id, str(state), what, until, position))
        return True

    def _project(self, stream: _Stream) -> None:
        if self.projector is not None and stream.job is not None:
            self.projector.put(stream.job, stream.position, stream.funded_at)
            if self.projector.pending >= 1_000:
                self.projector.flush()

    def _compare_checkpoint(self, checkpoint: Checkpoint, projector: Projector) -> None:
        self.checkpoints_seen.add(checkpoint.position)
        if checkpoint.log_digest != projector.digest.hex() or checkpoint.events != projector.events:
            self.find(
                "tamper",
                "log differs from what the read model saw: an event at or before this position was "
                "changed, removed, inserted or moved",
                f"read model: {checkpoint.events} events, digest {checkpoint.log_digest[:16]}...; "
                f"log now: {projector.events} events, digest {projector.digest.hex()[:16]}...",
                position=checkpoint.position,
            )

    # ------------------------------------------------------------------ the end

    def finish(self) -> AuditReport:
        self.line = None
        self.current = -1
        for originator_id, stream in list(self.open.items()) + list(self.recent.items()):
            self._check(stream, originator_id, stream.position, quiescent=self.quiescent)
            self._project(stream)
        for originator_id in self.bounties:
            self._check_bounty(originator_id, None, quiescent=self.quiescent)
        for originator_id, (position, rules, waiting, state) in self.evicted.items():
            if self._busy(originator_id, state, waiting, position):
                rules = [rule for rule in rules if not rule.startswith(LEFT_IN_FLIGHT)]
            for rule in rules:
                self.find("invariant", rule, position=position, job_id=originator_id)
        self.open.clear()
        self.recent.clear()
        self.evicted.clear()
        missed = sorted(
            p for p in self.live_checkpoints if p not in self.checkpoints_seen and p <= self.last_position
        )
        if missed:
            self.find(
                "tamper",
                "the read model checkpointed a position that is no longer in the log",
                f"positions {', '.join(map(str, missed[:5]))}",
                position=missed[0],
            )
        if self.projector is not None:
            self.projector.flush()
        self.report.elapsed_s = time.perf_counter() - self.started
        return self.report


# ---------------------------------------------------------------------------------- the store


def audit(
    app: Application[Any],
    *,
    read_model: ReadModel | None = None,
    seals: Seals | None = None,
    quiescent: bool = True,
    page_size: int = DEFAULT_PAGE_SIZE,
    max_open: int = DEFAULT_MAX_OPEN,
    settled: bool = False,
    now: Clock | None = None,
) -> AuditReport:
    """Audit the whole store of `app` (see the module docstring); never raises on a bad log.

    With `read_model`, it is first caught up to the end of the log, then compared with a rebuild of
    every view into a scratch database, and its log checkpoints with the log as it is now.
    `seals` defaults to the application's mapper when it seals events (the chain mapper).
    `quiescent` adds the rule that holds when no engine is running: no funded job left in flight,
    except a job waiting on a service within the bound its log fixes (reported in `in_flight`);
    `settled` makes that rule strict (every funded job released, refunded or in ATTENTION). `now`
    (default: the wall clock) is the moment the bounds are compared with.
    """
    started = time.perf_counter()  # the rate printed covers the whole audit, catch-up and compare too
    seals = seals if seals is not None else seals_of(app)
    mapper = app.mapper
    recorder = app.recorder
    stop = recorder.max_notification_id() or 0
    notes: list[str] = []
    if seals is None:
        notes.append("the store's events are not sealed: the per-job chain was not checked")
    live_checkpoints: dict[int, Checkpoint] | None = None
    if read_model is not None:
        try:
            read_model.catch_up(stop=stop)
        except Exception as error:
            notes.append(f"the read model could not catch up with the log: {error}")
        live_checkpoints = read_model.checkpoints()
    with tempfile.TemporaryDirectory(prefix="podsettle-audit-") as scratch_dir:
        scratch = ViewStore(str(Path(scratch_dir) / "views.db")) if read_model is not None else None
        projector = Projector(scratch, app.name) if scratch is not None else None
        auditor = Auditor(
            source=f"the {app.name} store",
            decoder=Decoder(mapper.transcoder if isinstance(mapper.transcoder, JSONTranscoder) else None),
            seals=seals,
            history=store_history(app),
            projector=projector,
            live_checkpoints=live_checkpoints,
            quiescent=quiescent,
            # PostgreSQL sequences skip ids (a rolled-back insert): a gap there is no tampering.
            gaps_are_tampering=not any(
                c.__module__ == "eventsourcing.postgres" for c in type(recorder).__mro__
            ),
            max_open=max_open,
            decrypt=bool(mapper.cipher or mapper.compressor),
            settled=settled,
            now=now,
        )
        if stop:
            for page in store_pages(app, stop=stop, page_size=page_size):
                auditor.feed(page)
        report = auditor.finish()
        report.notes.extend(notes)
        if read_model is not None and scratch is not None and projector is not None:
            _compare_views(auditor, read_model, scratch, projector)
            report.views_compared = True
            scratch.close()
        report.elapsed_s = time.perf_counter() - started
    log.info("audit finished", ok=report.ok, events=report.events, findings=len(report.findings))
    return report


def _compare_views(auditor: Auditor, live: ReadModel, scratch: ViewStore, projector: Projector) -> None:
    tracking = live.tracking
    last = auditor.last_position
    if tracking.position > last:
        auditor.find(
            "tamper",
            "the read model has seen more of the log than the store holds: events at its end were removed",
            f"read model at position {tracking.position}, log ends at {last}",
            position=last + 1,
        )
    elif tracking.position == last and tracking.log_digest != projector.digest.hex():
        auditor.find(
            "tamper",
            "log differs from what the read model saw (log digest at the last position)",
            position=last,
        )
    for view in VIEWS:
        mine, theirs = scratch.tallies(view), live.views.tallies(view)
        for key in sorted(set(mine) | set(theirs)):
            rebuilt, kept = mine.get(key), theirs.get(key)
            if rebuilt is None or kept is None or rebuilt.values() != kept.values():
                auditor.find(
                    "projection",
                    f"{view} totals differ from a rebuild",
                    f"{view} {key!r}: read model {kept and kept.to_json()}, "
                    f"rebuild {rebuilt and rebuilt.to_json()}",
                )
    # Rows are compared as stored (the same text is the same row); rows whose text differs are read
    # and compared field by field (amounts as Decimals, times as datetimes), as the finding names them.
    rebuilt_rows, live_rows = scratch.iter_records(), live.views.iter_records()
    rebuilt_rec, kept_rec = next(rebuilt_rows, None), next(live_rows, None)
    while rebuilt_rec is not None or kept_rec is not None:
        if kept_rec is None or (rebuilt_rec is not None and rebuilt_rec[0] < kept_rec[0]):
            assert rebuilt_rec is not None
            job_id, detail = rebuilt_rec[0], "missing from the read model"
            rebuilt_rec = next(rebuilt_rows, None)
        elif rebuilt_rec is None or kept_rec[0] < rebuilt_rec[0]:
            job_id, detail = kept_rec[0], "in the read model but not in the log"
            kept_rec = next(live_rows, None)
        else:
            job_id = rebuilt_rec[0]
            if rebuilt_rec == kept_rec:
                rebuilt_rec, kept_rec = next(rebuilt_rows, None), next(live_rows, None)
                continue
            mine_row, their_row = row_from_record(rebuilt_rec), row_from_record(kept_rec)
            changed = [
                name for name in mine_row.__slots__ if getattr(mine_row, name) != getattr(their_row, name)
            ]
            detail = ", ".join(
                f"{name}: read model {getattr(their_row, name)!s}, rebuild {getattr(mine_row, name)!s}"
                for name in changed
            )
            rebuilt_rec, kept_rec = next(rebuilt_rows, None), next(live_rows, None)
            if not changed:
                continue
        auditor.find("projection", "job row differs from a rebuild", detail, job_id=job_id)
