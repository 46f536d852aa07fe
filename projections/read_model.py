"""The read model facade: catch up with the event log, and answer the questions operators ask.

Several readers (threads, processes, machines) may keep the same views: each page is written only
if the views' position is still the one this reader's tallies were read at, else it reloads them
and carries on from where the other reader got (no event is counted twice).

Pull-based: eventsourcing cannot subscribe to a SQLite recorder, so `catch_up()` reads the
notifications after the tracked position, a page at a time (projections/follower.py, the follower
the engine uses too), and flushes each page with its position in one transaction. It is cheap to
call often: with nothing new it costs one small query.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.utils import resolve_topic

from podsettle.domain import EscrowJob, State, fmt
from podsettle.domain.money import QUANTUM
from podsettle.projections.apply import Applier, Creator, applier, creator
from podsettle.projections.follower import LogFollower
from podsettle.projections.rows import JobRow, Totals
from podsettle.projections.views import (
    CHECKPOINT_EVERY,
    Checkpoint,
    Projector,
    Tracking,
    ViewsMoved,
    ViewStore,
)
from podsettle.support.lru import keep

_MOVED_RETRIES = 100  # catch-ups that found the views moved by another reader, in a row
DEFAULT_PAGE_SIZE = 5_000  # each page is one flush: a job spread over a page is one row update, not several
_job_topics: dict[str, bool] = {}


def is_job_topic(topic: str) -> bool:
    """Whether a stored event's topic is one of EscrowJob's events (the log holds other aggregates too)."""
    known = _job_topics.get(topic)
    if known is None:
        try:
            cls = resolve_topic(topic)
        except Exception:
            known = False
        else:
            known = isinstance(cls, type) and issubclass(cls, (EscrowJob.Event, EscrowJob.Opened))
        _job_topics[topic] = known
    return known


@dataclass(frozen=True)
class Percentiles:
    """Nearest-rank percentiles of a duration, in milliseconds (None when nothing was measured)."""

    count: int
    p50: Decimal | None
    p90: Decimal | None
    p99: Decimal | None
    max: Decimal | None

    @classmethod
    def of(cls, sorted_values: Sequence[Decimal]) -> Percentiles:
        n = len(sorted_values)
        if n == 0:
            return cls(0, None, None, None, None)

        def rank(p: int) -> Decimal:
            return sorted_values[max(math.ceil(p * n / 100) - 1, 0)]

        return cls(n, rank(50), rank(90), rank(99), sorted_values[-1])

    def to_json(self) -> dict[str, Any]:
        def text(value: Decimal | None) -> str | None:
            return None if value is None else f"{value:f}"

        return {
            "count": self.count,
            "p50": text(self.p50),
            "p90": text(self.p90),
            "p99": text(self.p99),
            "max": text(self.max),
        }


@dataclass(frozen=True)
class Timings:
    funding_ms: Percentiles  # Funded.timestamp - Opened.timestamp
    delay_ms: Percentiles  # RunPod queue delay
    execution_ms: Percentiles  # RunPod execution time
    gpu_seconds: Decimal  # sum of execution times
    gpu_second_price: Decimal | None
    compute_cost_floor: Decimal | None  # gpu_seconds x price, rounded down: billing is never below it

    def to_json(self) -> dict[str, Any]:
        return {
            "funding_ms": self.funding_ms.to_json(),
            "delay_ms": self.delay_ms.to_json(),
            "execution_ms": self.execution_ms.to_json(),
            "gpu_seconds": f"{self.gpu_seconds:f}",
            "gpu_second_price": None if self.gpu_second_price is None else f"{self.gpu_second_price:f}",
            "compute_cost_floor": None if self.compute_cost_floor is None else fmt(self.compute_cost_floor),
        }


@dataclass(frozen=True)
class Earnings:
    """What one worker earned, in the words of the totals: `to_workers` includes the bonuses."""

    payee: str
    jobs: int
    paid_jobs: int
    to_workers: Decimal
    bonus_net: Decimal
    still_held: Decimal  # in escrows for this worker that are not released or refunded yet

    def to_json(self) -> dict[str, Any]:
        return {
            "payee": self.payee,
            "jobs": self.jobs,
            "paid_jobs": self.paid_jobs,
            "to_workers": fmt(self.to_workers),
            "bonus_net": fmt(self.bonus_net),
            "still_held": fmt(self.still_held),
        }


@dataclass(frozen=True)
class EndpointSpend:
    endpoint_id: str
    totals: Totals
    gpu_seconds: Decimal
    compute_cost_floor: Decimal | None

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            **self.totals.to_json(),
            "gpu_seconds": f"{self.gpu_seconds:f}",
            "compute_cost_floor": None if self.compute_cost_floor is None else fmt(self.compute_cost_floor),
        }


def gpu_seconds(execution_ms: int) -> Decimal:
    return Decimal(execution_ms) / 1000


def cost_floor(seconds: Decimal, price: Decimal | None) -> Decimal | None:
    if price is None:
        return None
    return (seconds * price).quantize(QUANTUM, rounding=ROUND_DOWN)


class ReadModel:
    """Batch totals, worker earnings, endpoint spend, jobs by state and timings, fed from `app`'s log.

    `path` is the read model's own SQLite file (None: an in-memory database, for tests), or the
    views themselves (projections/views_pg.py: the tables inside a PostgreSQL store).
    `gpu_second_price` (USDC per GPU-second) turns execution time into a compute-cost lower bound.
    `checkpoint_every` events, the running digest of the log is kept, for the audit to compare with
    the log as it is later (a smaller interval places a moved event more closely).
    """

    def __init__(
        self,
        app: Application[Any],
        path: str | ViewStore | None = None,
        *,
        gpu_second_price: Decimal | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        cache_size: int = 2048,
        checkpoint_every: int = CHECKPOINT_EVERY,
    ) -> None:
        if gpu_second_price is not None and (
            not isinstance(gpu_second_price, Decimal) or gpu_second_price < 0
        ):
            raise ValueError("gpu_second_price must be a non-negative Decimal")
        self.app = app
        self.gpu_second_price = gpu_second_price
        self.page_size = page_size
        self.cache_size = cache_size
        self.checkpoint_every = checkpoint_every
        self.views = path if isinstance(path, ViewStore) else ViewStore(path)
        self.projector = self._projector()
        self._jobs: OrderedDict[int | str, EscrowJob] = OrderedDict()
        self._appliers: dict[type, Applier | None] = {}
        self._creators: dict[type, Creator | None] = {}
        self._lock = threading.RLock()
        self._written = 0  # events the running catch-up has written (its pages are committed)

    # ------------------------------------------------------------------ updating

    @property
    def tracking(self) -> Tracking:
        return Tracking(self.projector.position, self.projector.events, self.projector.digest.hex())

    @property
    def position(self) -> int:
        return self.projector.position

    def catch_up(self, stop: int | None = None) -> int:
        """Apply every notification after the tracked position (up to `stop`); returns how many."""
        with self._lock:
            self._written = 0
            for _ in range(_MOVED_RETRIES):
                if self.views.tracking(self.app.name).position != self.projector.stored_position:
                    # Another reader (another process, or another model on the same views) moved
                    # the views: what this one holds in memory is stale.
                    self._reload()
                try:
                    self._catch_up(stop)
                    return self._written
                except ViewsMoved:
                    self._reload()  # nothing of the page was written; carry on from the views
                except BaseException:
                    # The failed page's transaction was rolled back: forget what was applied in memory.
                    self._reload()
                    raise
            raise ViewsMoved(f"the views kept moving under {_MOVED_RETRIES} catch-ups in a row")

    def _catch_up(self, stop: int | None) -> None:
        to_domain_event = self.app.mapper.to_domain_event
        projector = self.projector
        appliers = self._appliers
        # Every notification, whatever its aggregate: each one moves the log digest.
        follower = LogFollower(self.app.recorder, page_size=self.page_size)
        for page in follower.pages_after(projector.position, stop):
            for note in page.notifications:
                version = note.originator_version
                projector.observe(note.id, note.originator_id, version, note.topic, note.state)
                if not is_job_topic(note.topic):
                    continue
                event: Any = to_domain_event(note)
                before = self._job_before(note.originator_id, version)
                kind = type(event)
                try:
                    apply = appliers[kind]
                except KeyError:
                    apply = appliers[kind] = applier(kind)
                if before is None:
                    try:
                        create = self._creators[kind]
                    except KeyError:
                        create = self._creators[kind] = creator(kind)
                    job = event.mutate(None) if create is None else create(event)
                elif apply is not None and before.version + 1 == version:
                    apply(before, event)  # the job is the event's (found by its id), at the version before
                    job = before
                else:
                    job = event.mutate(before)
                self._remember(job)
                projector.apply(job, event, note.id)
            projector.flush()
            self._written += len(page.notifications)

    def _projector(self) -> Projector:
        return Projector(
            self.views, self.app.name, cache_size=self.cache_size, checkpoint_every=self.checkpoint_every
        )

    def _reload(self) -> None:
        self._jobs.clear()
        self.projector = self._projector()

    def _job_before(self, job_id: UUID | str, version: int) -> EscrowJob | None:
        if version == 1:
            return None
        job = self._jobs.get(job_id.int if isinstance(job_id, UUID) else job_id)
        if job is not None and job.version == version - 1:
            return job
        loaded: EscrowJob = self.app.repository.get(job_id, version=version - 1)
        return loaded

    def _remember(self, job: EscrowJob) -> None:
        """Keep the job for its next event (a UUID is kept under its integer: hashed in C)."""
        job_id = job.id
        keep(self._jobs, job_id.int if isinstance(job_id, UUID) else job_id, job, self.cache_size)

    def rebuild(self) -> int:
        """Drop every view and build it again from the whole log; returns the events read."""
        with self._lock:
            self.views.drop()
            self._reload()
            return self.catch_up()

    def close(self) -> None:
        self.views.close()

    # ------------------------------------------------------------------ queries

    def batch_totals(self, batch_id: str | None = None) -> Totals:
        """Totals of one batch, or of every job when `batch_id` is None."""
        view, key = ("all", "") if batch_id is None else ("batch", batch_id)
        return self.views.tally(view, key) or Totals()

    def batches(self) -> dict[str | None, Totals]:
        return {key or None: tally for key, tally in self.views.tallies("batch").items()}

    def earnings(self) -> list[Earnings]:
        return [
            Earnings(payee, t.jobs, t.paid_jobs, t.to_workers, t.bonus_net, t.still_held)
            for payee, t in self.views.tallies("payee").items()
        ]

    def endpoint_spend(self) -> list[EndpointSpend]:
        spend = []
        for endpoint, tally in self.views.tallies("endpoint").items():
            seconds = gpu_seconds(tally.execution_ms)
            spend.append(EndpointSpend(endpoint, tally, seconds, cost_floor(seconds, self.gpu_second_price)))
        return spend

    def jobs(self, state: State | str | None = None, batch_id: str | None = None) -> list[JobRow]:
        wanted = None if state is None else str(State(str(state).upper()))
        return self.views.rows(state=wanted, batch_id=batch_id)

    def job(self, job_id: UUID | str) -> JobRow | None:
        return self.views.row(str(job_id))

    def state_counts(self, batch_id: str | None = None) -> dict[str, int]:
        counts = {str(state): 0 for state in State}
        for row in self.views.rows(batch_id=batch_id):
            counts[row.state] += 1
        return {state: n for state, n in counts.items() if n}

    def timings(self, batch_id: str | None = None) -> Timings:
        views = self.views
        funding = [Decimal(us) / 1000 for us in views.column("funding_us", batch_id=batch_id)]
        delay = [Decimal(ms) for ms in views.column("delay_ms", batch_id=batch_id)]
        execution = [Decimal(ms) for ms in views.column("execution_ms", batch_id=batch_id)]
        seconds = gpu_seconds(self.batch_totals(batch_id).execution_ms)
        return Timings(
            funding_ms=Percentiles.of(funding),
            delay_ms=Percentiles.of(delay),
            execution_ms=Percentiles.of(execution),
            gpu_seconds=seconds,
            gpu_second_price=self.gpu_second_price,
            compute_cost_floor=cost_floor(seconds, self.gpu_second_price),
        )

    def checkpoints(self) -> dict[int, Checkpoint]:
        return self.views.checkpoints()

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's rows, for comparing this read model with a rebuild."""
        return self.views.dump()
