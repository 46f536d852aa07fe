"""What the dashboard shows, read from the store: the answers behind every route of the JSON API.

The server follows the store's log on every read (like every read command of the command line), so
a `podsettle batch` in another process writing to the same store shows up on the next poll. It keeps
its read model in memory, built from the log when it starts: this process is then the only writer
of those views, and a read command running meanwhile on the store's views file cannot make either
of them count an event twice.

Every store call runs on one worker thread: the read model and the application's recorder are used
by one thread at a time, and the event loop stays free to answer while a large catch-up runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.utils import resolve_topic

from podsettle.application import Settlements
from podsettle.domain import EscrowJob, State, fmt
from podsettle.domain.money import ZERO
from podsettle.projections import ReadModel
from podsettle.projections.follower import LogFollower

T = TypeVar("T")
MAX_JOBS_PAGE = 1_000
MAX_CHART_POINTS = 240
TICKS_PER_SECOND = 10
# Fields every event has, shown apart from its own fields (or not at all) in a timeline.
_EVENT_BOOKKEEPING = frozenset(("originator_id", "originator_version", "timestamp", "originator_topic"))


class BadQuery(ValueError):
    """A query parameter the API cannot answer (a 400); the message names the parameter."""


class NotFound(LookupError):
    """No such job in the store (a 404)."""


@dataclass(frozen=True)
class SettledPoint:
    at: datetime
    to_workers: Decimal  # cumulative: released to workers, bonuses included
    returned: Decimal  # cumulative: back with the payer (refunds, remainders of partial releases)

    def to_json(self) -> dict[str, str]:
        return {"at": self.at.isoformat(), "to_workers": fmt(self.to_workers), "returned": fmt(self.returned)}


class SettledSeries:
    """Money settled over time, per tenth of a second, followed from the log: every Released,
    Refunded and BonusAwarded event (the facts the read model's `to_workers` and `returned` are sums
    of). A tenth of a second: a batch on a fast service settles within a few seconds."""

    def __init__(self, app: Settlements, page_size: int = 5_000) -> None:
        self.app = app
        self.follower = LogFollower(app.recorder, page_size=page_size)
        self.position = 0
        self._ticks: dict[int, list[Decimal]] = {}  # epoch tenth of a second -> [to_workers, returned]
        self._kinds: dict[str, type | None] = {}

    def _kind(self, topic: str) -> type | None:
        """The settling event class a stored topic names (old, registered topics too), else None."""
        try:
            return self._kinds[topic]
        except KeyError:
            pass
        try:
            found = resolve_topic(topic)
        except Exception:
            found = None
        settling = (EscrowJob.Released, EscrowJob.Refunded, EscrowJob.BonusAwarded)
        kind = found if isinstance(found, type) and issubclass(found, settling) else None
        self._kinds[topic] = kind
        return kind

    def catch_up(self) -> int:
        done = 0
        for page in self.follower.pages_after(self.position):
            for note in page.notifications:
                if self._kind(note.topic) is None:
                    continue
                event: Any = self.app.mapper.to_domain_event(note)
                if isinstance(event, EscrowJob.Released):
                    paid, back = event.to_payee, event.returned
                elif isinstance(event, EscrowJob.BonusAwarded):
                    paid, back = event.to_payee, ZERO
                else:
                    paid, back = ZERO, event.returned
                tick = int(event.timestamp.timestamp() * TICKS_PER_SECOND)
                sums = self._ticks.setdefault(tick, [ZERO, ZERO])
                sums[0] += paid
                sums[1] += back
                done += 1
            self.position = page.position
        return done

    def points(self, max_points: int = MAX_CHART_POINTS) -> list[SettledPoint]:
        """Cumulative sums at each tick something settled, thinned to `max_points` (the last one,
        the totals, is always kept)."""
        points: list[SettledPoint] = []
        paid: Decimal = ZERO
        back: Decimal = ZERO
        for tick in sorted(self._ticks):
            paid += self._ticks[tick][0]
            back += self._ticks[tick][1]
            points.append(SettledPoint(datetime.fromtimestamp(tick / TICKS_PER_SECOND, UTC), paid, back))
        if len(points) <= max_points:
            return points
        step = len(points) / (max_points - 1)
        thinned = [points[int(i * step)] for i in range(max_points - 1)]
        return [*thinned, points[-1]]


class Dashboard:
    """The dashboard's reads over one store. Call `start()` once (it reads the whole log), then
    the query methods from the event loop; each catches up with the log first."""

    def __init__(self, app: Settlements) -> None:
        self.app = app
        self.model = ReadModel(app, None)  # in memory: see the module's docstring
        self.settled = SettledSeries(app)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="podsettle-web")

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def _refresh(self) -> None:
        self.model.catch_up()
        self.settled.catch_up()

    async def start(self) -> None:
        await self._call(self._refresh)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.model.close()

    # ------------------------------------------------------------------ queries

    async def overview(self, batch_id: str | None) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            self._refresh()
            batches = [
                {"batch_id": key, **totals.to_json()}
                for key, totals in sorted(self.model.batches().items(), key=lambda kv: kv[0] or "")
            ]
            return {
                "position": self.model.position,
                "batch_id": batch_id,
                "totals": self.model.batch_totals(batch_id).to_json(),
                # Every state, those without jobs too: the page's state filter lists them.
                "states": {str(state): 0 for state in State} | self.model.state_counts(batch_id),
                "batches": batches,
            }

        return await self._call(read)

    async def jobs(
        self, *, batch_id: str | None, state: str | None, limit: int, offset: int
    ) -> dict[str, Any]:
        wanted = _state(state)
        if not 1 <= limit <= MAX_JOBS_PAGE:
            raise BadQuery(f"limit: must be between 1 and {MAX_JOBS_PAGE}")
        if offset < 0:
            raise BadQuery("offset: must not be negative")

        def read() -> dict[str, Any]:
            self._refresh()
            rows = self.model.jobs(state=wanted, batch_id=batch_id)
            rows.reverse()  # the most recently changed first
            return {
                "position": self.model.position,
                "count": len(rows),
                "limit": limit,
                "offset": offset,
                "jobs": [row.to_json() for row in rows[offset : offset + limit]],
            }

        return await self._call(read)

    async def job(self, job_id: str) -> dict[str, Any]:
        try:
            uid = UUID(job_id)
        except ValueError:
            raise BadQuery(f"job_id: {job_id!r} is not a job id (a UUID)") from None

        def read() -> dict[str, Any]:
            events = list(self.app.events.get(uid))
            if not events:
                raise NotFound(f"no job {job_id}")
            job = self.app.get_job(uid)
            return {"job": job.summary(), "events": [timeline_entry(event) for event in events]}

        return await self._call(read)

    async def earnings(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            self._refresh()
            rows = sorted(self.model.earnings(), key=lambda e: (-e.to_workers, e.payee))
            return {"position": self.model.position, "earnings": [e.to_json() for e in rows]}

        return await self._call(read)

    async def attention(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            self._refresh()
            waiting = []
            for row in self.model.jobs(state=State.ATTENTION):
                job = self.app.get_job(row.job_id)
                attention = dict(job.attention or {})
                waiting.append(
                    {
                        **job.summary(),
                        "step": attention.pop("step", None),
                        "reason": attention.pop("reason", None),
                        "known": attention,
                    }
                )
            return {"position": self.model.position, "attention": waiting}

        return await self._call(read)

    async def settled_over_time(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            self._refresh()
            points = self.settled.points()
            last = points[-1] if points else None
            return {
                "position": self.model.position,
                "to_workers": fmt(last.to_workers if last else ZERO),
                "returned": fmt(last.returned if last else ZERO),
                "points": [p.to_json() for p in points],
            }

        return await self._call(read)


def _state(state: str | None) -> State | None:
    if state is None or state == "":
        return None
    try:
        return State(state.upper())
    except ValueError:
        names = ", ".join(s.lower() for s in State.__members__)
        raise BadQuery(f"state: {state!r} is not one of {names}") from None


def timeline_entry(event: Any) -> dict[str, Any]:
    """One event of a job's timeline: its version, name, time and own fields (amounts as strings)."""
    fields = {
        name: _plain(value) for name, value in sorted(vars(event).items()) if name not in _EVENT_BOOKKEEPING
    }
    return {
        "version": event.originator_version,
        "event": type(event).__name__,
        "at": event.timestamp.isoformat(),
        "fields": fields,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return fmt(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
