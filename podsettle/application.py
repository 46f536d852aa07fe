"""The `Settlements` application: the event-sourced store of escrow jobs.

It opens jobs and answers queries. Commands that change a job go through one path, the job writer
(podsettle/writer.py), which saves them in groups and handles races with other writers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.persistence import IntegrityError, Transcoder
from eventsourcing.utils import get_topic

from podsettle.adapters.chain import ChainMapper
from podsettle.adapters.persistence import Store, creating_tables, select_events_of, store_from_url
from podsettle.adapters.transcoder import FastJSONTranscoder
from podsettle.domain import EscrowJob, State
from podsettle.domain.digests import canonical_json, digest_bytes
from podsettle.domain.errors import ConflictingOutcome, InvalidInput, JobNotFound
from podsettle.domain.escrow_job import check_id, job_id_for
from podsettle.domain.job_input import JobInput, input_id_for
from podsettle.projections.follower import LogFollower
from podsettle.requests import JobRequest

T = TypeVar("T")
MAX_RACE_RETRIES = 20


class Settlements(Application[UUID]):
    """Opens escrow jobs and reads them back; the job writer records their intents, attempts and
    outcomes."""

    name = "podsettle"
    is_snapshotting_enabled = False

    def __init__(self, store: Store | str | None = None, env: Mapping[str, str] | None = None) -> None:
        store_ = store_from_url(store) if isinstance(store, str) else store
        merged: dict[str, str] = dict(store_.env if store_ else {})
        merged.update(env or {})
        self.store = store_
        super().__init__(env=merged)
        self._opened_topic = get_topic(EscrowJob.Opened)

    def construct_recorder(self) -> Any:
        """The library's recorder, its tables created when missing, one process at a time
        (`creating_tables`: processes starting together on a new PostgreSQL database race)."""
        with creating_tables(self.factory):
            return super().construct_recorder()

    def construct_mapper(self) -> ChainMapper:
        """Every stored event is sealed and chained to its job's previous event (adapters/chain.py)."""
        return ChainMapper(
            transcoder=self.construct_transcoder(),
            compressor=self.factory.compressor(),
            cipher=self.factory.cipher(),
            recorder=lambda: getattr(self, "recorder", None),
        )

    def construct_transcoder(self) -> Transcoder:
        """The library's JSON format, written and read with orjson (adapters/transcoder.py), unless
        `TRANSCODER_TOPIC` names another transcoder."""
        if self.env.get(self.factory.TRANSCODER_TOPIC):
            return super().construct_transcoder()
        transcoder = FastJSONTranscoder()
        self.register_transcodings(transcoder)
        return transcoder

    # ------------------------------------------------------------------ opening

    def open_job(self, spec: JobRequest) -> UUID:
        """Open one job (idempotent by its key: the same request twice opens it once)."""
        return self.open_jobs([spec])[0]

    def open_jobs(self, specs: Sequence[JobRequest]) -> list[UUID]:
        """Open many jobs in one atomic save (a batch: all or nothing)."""
        built = [self.build(spec) for spec in specs]
        keys = [job.job_key for job, _ in built]
        if len(set(keys)) != len(keys):
            raise InvalidInput("job_key", "the same key appears twice in one batch")
        stored = self.get_jobs([job.id for job, _ in built], as_opened=True) if len(built) > 1 else None
        if stored is not None:  # one query for the whole batch (PostgreSQL), not one per job
            fresh = [(job, extra) for job, extra in built if not self._same_job(stored.get(job.id), job)]
        else:
            fresh = [(job, extra) for job, extra in built if not self.matches_existing(job)]
        if fresh:
            try:
                self.save(*(a for job, extra in fresh for a in (job, *extra)))
            except IntegrityError:
                # Another writer opened one of them meanwhile: accept it only if it is the same job.
                for job, _ in fresh:
                    if not self.matches_existing(job):
                        raise
        return [job.id for job, _ in built]

    def build(self, spec: JobRequest) -> tuple[EscrowJob, list[JobInput]]:
        """The aggregates that opening `spec` saves: the job, and its input when one is given."""
        job = self._new_job(spec)
        extra = []
        if spec.job_input is not None:
            payload = dict(spec.job_input)
            # The stored value must give back the very bytes that were digested (and will be sent).
            if canonical_json(payload, "job_input") != spec.input_bytes:
                raise InvalidInput("job_input", "does not encode to the request's input bytes")
            if digest_bytes(spec.input_bytes) != spec.input_digest:
                raise InvalidInput("input_digest", "does not match the job input")
            extra.append(JobInput(job_key=spec.job_key, digest=spec.input_digest, payload=payload))
        return job, extra

    def job_inputs(self, job_keys: Sequence[str]) -> dict[str, dict[str, Any]] | None:
        """The inputs several jobs were opened with, read in one query (those found), or None on a
        store that has no such read (then read them one by one with `job_input`)."""
        ids = {input_id_for(job_key): job_key for job_key in job_keys}
        stored = select_events_of(self.recorder, list(ids), first_only=True)
        if stored is None:
            return None
        found: dict[str, dict[str, Any]] = {}
        for input_id, events in stored.items():
            record: Any = _project(None, map(self.mapper.to_domain_event, events))
            if isinstance(record, JobInput):
                found[ids[input_id]] = record.payload
        return found

    def job_input(self, job_key: str) -> dict[str, Any] | None:
        """The input a job was opened with, or None when it was opened without one."""
        try:
            record: JobInput = self.repository.get(input_id_for(job_key))
        except AggregateNotFoundError:
            return None
        return record.payload

    def _new_job(self, spec: JobRequest) -> EscrowJob:
        return EscrowJob.open(
            job_key=spec.job_key,
            endpoint_id=spec.endpoint_id,
            input_digest=spec.input_digest,
            payer=spec.payer,
            payee=spec.payee,
            budget=spec.budget,
            deadline=spec.deadline,
            batch_id=spec.batch_id,
            referral=spec.referral,
            acceptance=dict(spec.acceptance) if spec.acceptance is not None else None,
            bonus_pool=spec.bonus_pool,
            dialect=spec.dialect,
            refund_method=spec.refund_method,
            price_per_item=spec.price_per_item,
            retry_of=spec.retry_of,
        )

    def matches_existing(self, job: EscrowJob) -> bool:
        """True when the job is already stored; an error when its key holds a different job."""
        try:
            existing = self.get_job(job.id)
        except JobNotFound:
            return False
        return self._same_job(existing, job)

    @staticmethod
    def _same_job(existing: EscrowJob | None, job: EscrowJob) -> bool:
        if existing is None:
            return False
        same = all(
            getattr(existing, name) == getattr(job, name)
            for name in (
                "endpoint_id",
                "input_digest",
                "payer",
                "payee",
                "budget",
                "batch_id",
                "referral",
                "price_per_item",
                "retry_of",
            )
        )
        if not same:
            raise ConflictingOutcome(
                job.id, existing.state, "open", f"key {job.job_key!r} opened a different job"
            )
        return True

    def save_all(self, aggregates: Sequence[Any]) -> None:
        """`save(*aggregates)` without the library's per-object protocol checks, which cost more
        than encoding the events when a writer saves hundreds of jobs at once (eventsourcing 9.5)."""
        processing = ProcessingEvent[UUID]()
        for aggregate in aggregates:
            processing.events.extend(aggregate.collect_events())
            processing.aggregates[aggregate.id] = aggregate
        recordings = self._record(processing)
        self._notify(recordings)

    # ------------------------------------------------------------------ queries

    def get_job(self, job_id: UUID | str) -> EscrowJob:
        uid = self._uuid(job_id)
        try:
            job: EscrowJob = self.repository.get(uid, projector_func=_project)
        except AggregateNotFoundError:
            raise JobNotFound(job_id) from None
        return job

    def get_jobs(
        self,
        job_ids: Sequence[UUID],
        *,
        as_opened: bool = False,
        known: Mapping[UUID, EscrowJob] | None = None,
    ) -> dict[UUID, EscrowJob] | None:
        """Several jobs read in one query (those found), or None on a store that has no such read
        (then read them one by one with `get_job`). `as_opened`: each job as it was opened (its
        first event only), enough to compare it with a job opened again. `known`: copies of some of
        the jobs as they were saved at their versions, brought up to date in place with only the
        events stored after them (a job another process moved on costs its new events, not its
        whole history)."""
        known = {} if as_opened or known is None else known
        after = {job_id: job.version for job_id, job in known.items()}
        stored = select_events_of(self.recorder, job_ids, first_only=as_opened, after=after)
        if stored is None:
            return None
        asked = set(job_ids)
        jobs: dict[UUID, EscrowJob] = {job_id: job for job_id, job in known.items() if job_id in asked}
        for job_id, events in stored.items():
            aggregate: Any = _project(known.get(job_id), map(self.mapper.to_domain_event, events))
            if isinstance(aggregate, EscrowJob):
                jobs[job_id] = aggregate
        return jobs

    def caught_up(self, job: EscrowJob) -> EscrowJob:
        """A copy of a job as it was saved at its version, brought up to date in place with the
        events stored after it (another process may have written them)."""
        caught: EscrowJob = _project(job, self.events.get(job.id, gt=job.version))
        return caught

    def find_job(self, job_key: str) -> EscrowJob:
        check_id(job_key, "job_key")
        return self.get_job(job_id_for(job_key))

    def job_ids(self, *, batch_id: str | None = None) -> Iterator[UUID]:
        """Every job id in log order, optionally only those of one batch (from the Opened events)."""
        opened = LogFollower(self.recorder, topics=[self._opened_topic], page_size=500)
        for page in opened.pages_after(0):
            for notification in page.notifications:
                if batch_id is not None:
                    event = self.mapper.to_domain_event(notification)
                    if getattr(event, "batch_id", None) != batch_id:
                        continue
                originator = notification.originator_id
                yield originator if isinstance(originator, UUID) else UUID(str(originator))

    def payers(self) -> list[str]:
        """The payers jobs were opened under, in the order they first appear (read from the Opened
        events; used only to name the agent a key belongs to when it is not the configured payer)."""
        found: dict[str, None] = {}
        opened = LogFollower(self.recorder, topics=[self._opened_topic], page_size=500)
        for page in opened.pages_after(0):
            for notification in page.notifications:
                payer = getattr(self.mapper.to_domain_event(notification), "payer", None)
                if isinstance(payer, str):
                    found[payer] = None
        return list(found)

    def list_jobs(self, *, state: State | str | None = None, batch_id: str | None = None) -> list[EscrowJob]:
        wanted = None if state is None else State(str(state).upper())
        jobs = (self.get_job(job_id) for job_id in self.job_ids(batch_id=batch_id))
        return [job for job in jobs if wanted is None or job.state == wanted]

    @staticmethod
    def _uuid(job_id: UUID | str) -> UUID:
        if isinstance(job_id, UUID):
            return job_id
        try:
            return UUID(str(job_id))
        except ValueError:
            raise InvalidInput("job_id", f"{job_id!r} is not a job id (a UUID)") from None


def _project(aggregate: Any, domain_events: Iterable[Any]) -> Any:
    """The library's `project_aggregate` without its assert that each event is an instance of a
    runtime-checkable protocol: that check alone was a fifth of the CPU of reading jobs in bulk on
    PostgreSQL. Each event applies itself with its own `mutate`, as there."""
    for domain_event in domain_events:
        aggregate = domain_event.mutate(aggregate)
    return aggregate
