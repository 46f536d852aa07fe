"""`podsettle migrate --from STORE --to STORE`: copy an event log between stores (SQLite and
PostgreSQL, either way) and prove the copy.

The source is audited first (hash chains, invariants) and refused when the audit fails: a tampered
log copied into a new store would look clean there, its tampering hidden behind new positions. The
target must hold no events. The stored events are copied as stored (topic, aggregate, version and
the sealed, possibly encrypted, state bytes), in log order, a page per transaction; what depends on
positions (the engine's tracking, the read models) is not copied: the target's are rebuilt from its
log. Then the target's events are compared with the source's one by one, and the target is audited.

A copy that fails part-way leaves a partial target: the comparison reports it, and a new copy needs
an empty target again (drop the partial one).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import Notification, StoredEvent

from podsettle.adapters.persistence import StoreConfigError, store_from_url
from podsettle.projections.follower import LogFollower

PAGE_SIZE = 1_000


class MigrationRefused(StoreConfigError):
    """The source fails its audit, or the target is not empty: nothing was copied."""


@dataclass
class Migration:
    source: str
    target: str
    events: int = 0
    log_digest: str = ""  # sha256 of the events in log order, as stored: the same for both stores
    same_events: bool = False
    target_audit_ok: bool = False
    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.same_events and self.target_audit_ok

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "from": self.source,
            "to": self.target,
            "events": self.events,
            "log_digest": self.log_digest,
            "same_events": self.same_events,
            "target_audit_ok": self.target_audit_ok,
            "findings": self.findings,
        }


def _stored(app: Any, stop: int | None = None) -> Iterator[Notification]:
    for page in LogFollower(app.recorder, page_size=PAGE_SIZE).pages_after(0, stop):
        yield from page.notifications


def _key(event: StoredEvent) -> tuple[str, int, str, bytes]:
    return (str(event.originator_id), event.originator_version, event.topic, bytes(event.state))


def _step(h: Any, event: StoredEvent) -> None:
    originator, version, topic, state = _key(event)
    h.update(f"{originator}\n{version}\n{topic}\n{len(state)}\n".encode())
    h.update(state)


def migrate(
    source_url: str,
    target_url: str,
    *,
    env: Mapping[str, str] | None = None,
    source_env: Mapping[str, str] | None = None,
    target_env: Mapping[str, str] | None = None,
) -> Migration:
    """Copy the log of `source_url` into the empty store `target_url` and check the copy (see the
    module docstring); raises `MigrationRefused` before copying anything when it cannot."""
    from podsettle.adapters.chain import SEALS
    from podsettle.application import Settlements
    from podsettle.replay import audit

    source_store = store_from_url(source_url, "--from")
    target_store = store_from_url(target_url, "--to")
    path = source_store.sqlite_path
    if source_store.kind == "popo" or target_store.kind == "popo":
        raise MigrationRefused("an in-memory store cannot be migrated from or to")
    if path is not None and not path.exists():
        raise MigrationRefused(f"--from: {source_store.url} does not exist")
    if source_store.url == target_store.url and dict(source_env or {}) == dict(target_env or {}):
        raise MigrationRefused("--from and --to name the same store")
    source = Settlements(source_store, env={**(env or {}), **(source_env or {})})
    target = Settlements(target_store, env={**(env or {}), **(target_env or {})})
    try:
        head = source.recorder.max_notification_id() or 0
        if not head:
            raise MigrationRefused(f"--from: {source_store.url} is empty: there is nothing to copy")
        if target.recorder.max_notification_id():
            raise MigrationRefused(
                f"--to: {target_store.url} already holds events; migrate into an empty store"
            )
        checked = audit(source, seals=SEALS, quiescent=False)
        if not checked.ok:
            raise MigrationRefused(
                f"--from: {source_store.url} fails its audit ({len(checked.findings)} findings; "
                "`podsettle replay --store` shows them): not copied"
            )
        result = Migration(source_store.url, target_store.url)
        digest = hashlib.sha256()
        stored = _stored(source, head)
        while page := list(itertools.islice(stored, PAGE_SIZE)):
            events = [StoredEvent(n.originator_id, n.originator_version, n.topic, n.state) for n in page]
            target.recorder.insert_events(events)
            for event in events:
                _step(digest, event)
            result.events += len(events)
        result.log_digest = digest.hexdigest()
        result.same_events = _compare(source, target, head, result)
        report = audit(target, seals=SEALS, quiescent=False)
        result.target_audit_ok = report.ok
        result.findings.extend(f"target: {f.kind}: {f.rule} {f.detail}".rstrip() for f in report.findings)
        return result
    finally:
        source.close()
        target.close()


def _compare(source: Any, target: Any, head: int, result: Migration) -> bool:
    """Whether the target holds the source's events, in the same order, and nothing else."""
    pairs = itertools.zip_longest(_stored(source, head), _stored(target))
    for index, (mine, theirs) in enumerate(pairs, start=1):
        if mine is None or theirs is None or _key(mine) != _key(theirs):
            result.findings.append(f"event {index} of the log differs between the stores")
            return False
    return True
