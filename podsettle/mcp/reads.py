"""What the MCP tools read: a job with its event timeline (from the log), and the read models'
figures (jobs, totals, earnings, endpoint spend, what waits for an operator), all as plain JSON
data with amounts as strings."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from podsettle.application import Settlements
from podsettle.domain import EscrowJob, State
from podsettle.domain.money import fmt
from podsettle.projections import ReadModel, ViewStore

# Attributes every event carries that the timeline shows under its own names (or not at all).
_EVENT_HEADER = {"originator_id", "originator_version", "originator_topic", "timestamp"}


def plain(value: Any) -> Any:
    """A value of an event as JSON: amounts as strings with 6 places, times in ISO 8601."""
    if isinstance(value, Decimal):
        return fmt(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def timeline(app: Settlements, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The job's events in order: version, time, event name and what it recorded."""
    events = []
    for stored in app.recorder.select_events(job_id):
        event: Any = app.mapper.to_domain_event(stored)
        data = {k: plain(v) for k, v in vars(event).items() if k not in _EVENT_HEADER}
        events.append(
            {
                "version": event.originator_version,
                "at": event.timestamp.isoformat(),
                "event": type(event).__name__,
                "data": data,
            }
        )
    return events


def job_with_timeline(app: Settlements, job_id: uuid.UUID) -> dict[str, Any]:
    """The job as the log has it now, and its timeline (raises `JobNotFound`)."""
    job: EscrowJob = app.get_job(job_id)
    return {**job.summary(), "timeline": timeline(app, job.id)}


class Reads:
    """The read models of one store, caught up with its log before each answer. Blocking: the
    service calls it from a worker thread."""

    def __init__(self, app: Settlements, views: str | ViewStore | None) -> None:
        self.app = app
        self.model = ReadModel(app, views)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.model.close()

    def _fresh(self) -> ReadModel:
        with self._lock:
            self.model.catch_up()
        return self.model

    def jobs(self, *, batch_id: str | None, state: str | None, limit: int) -> dict[str, Any]:
        rows = self._fresh().jobs(state=state.upper() if state else None, batch_id=batch_id)
        return {
            "count": len(rows),
            "shown": min(limit, len(rows)),
            "jobs": [row.to_json() for row in rows[:limit]],
        }

    def totals(self, batch_id: str | None) -> dict[str, Any]:
        model = self._fresh()
        return {"batch_id": batch_id, "totals": model.batch_totals(batch_id).to_json()}

    def earnings(self) -> dict[str, Any]:
        model = self._fresh()
        return {
            "workers": [row.to_json() for row in model.earnings()],
            "endpoints": [row.to_json() for row in model.endpoint_spend()],
        }

    def attention(self) -> dict[str, Any]:
        waiting = []
        for row in self._fresh().jobs(state=State.ATTENTION):
            job = self.app.get_job(row.job_id)
            if job.state != State.ATTENTION:  # resolved since the read model saw it
                continue
            known = dict(job.attention or {})
            waiting.append(
                {
                    **job.summary(),
                    "step": known.pop("step", None),
                    "question": known.pop("reason", None),
                    "known": known,
                }
            )
        return {
            "count": len(waiting),
            "jobs": waiting,
            "how_to_resolve": "an operator runs `podsettle reconcile --resolve JOB_ID --finding ... "
            "--outcome ...` after checking the escrow service",
        }

    def audit(self) -> dict[str, Any]:
        from podsettle.adapters.chain import SEALS
        from podsettle.replay import audit

        with self._lock:
            report = audit(self.app, read_model=self.model, seals=SEALS)
        return report.to_json()
