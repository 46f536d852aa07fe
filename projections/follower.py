"""Following the event log: the notifications after a tracked position, a page at a time.

This is podsettle's one follower mechanism. The engine's intent follower (podsettle/engine.py: the
jobs other processes gave something to do, and the recovery scan on start) and the read model's
catch-up (projections/read_model.py) both read the log through `LogFollower`; each keeps its own
position where it must be kept:

- the engine's follower writes nothing but its position, kept in the library's tracking table
  (`TrackedPosition`, one row per follower name);
- the read model keeps its position in its own SQLite file, written in the same transaction as the
  rows and tallies it reflects (projections/views.py), so the two always agree after a crash.

Why not eventsourcing 9.5's `eventsourcing.projection` (`Projection`, `ProjectionRunner`,
`ApplicationSubscription`), tried against `Settlements` on each store:

- SQLite, podsettle's default store, cannot be subscribed to: `ApplicationSubscription` raises
  `NotImplementedError` ("The SQLiteApplicationRecorder recorder does not support subscriptions").
  A follower of a SQLite store must pull, which is what this module does on every store.
- `ProjectionRunner` builds its own application from `application_class(env)`: `Settlements(env)`
  fails (its first argument is the store), and even a suitable subclass would be a second
  application with its own connections; on the in-memory store it would follow an empty log of its
  own, not the engine's.
- The runner hands one decoded domain event at a time to `process_event` on threads of its own.
  The read model needs each notification's stored bytes (the log digest hashes them, audit/tamper
  checks depend on it), decodes only EscrowJob events, and commits once per page: per-event
  processing would be one view transaction per event (on SQLite, one commit per three rows was
  measured at 15.6k rows/s against 347k rows/s for all rows in one commit). The engine's
  follower needs only each intent's job id and version, and must run its store calls on the
  writer's single store thread, not on the runner's.
- There is no async API: the engine calls this module from its store thread (`JobWriter.call`).

What is kept of the library: the notification log API (`select_notifications` with a topics filter
and `max_notification_id`) and its `TrackingRecorder` for the engine's position.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    InternalError,
    Notification,
    Tracking,
    TrackingRecorder,
)

from podsettle.support.logs import get_logger

log = get_logger("podsettle.follower")

DEFAULT_PAGE_SIZE = 1_000


@dataclass(frozen=True)
class Page:
    """Notifications after a position, and the position a follower has read up to with them.

    With a topics filter the position can be past the last notification of the page: the events in
    between did not match, and were read all the same."""

    notifications: Sequence[Notification]
    position: int
    more: bool  # the page was full: more may follow at once


class LogFollower:
    """Reads `recorder`'s notification log after a position, `page_size` at a time, only `topics`
    when given (the store filters them). Stateless: callers keep their own position."""

    def __init__(
        self,
        recorder: ApplicationRecorder,
        *,
        topics: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.recorder = recorder
        self.topics = list(topics)
        self.page_size = page_size

    def page_after(self, position: int, stop: int | None = None) -> Page:
        """The next page after `position` (up to `stop`, inclusive, when given).

        Unfiltered, this is one query. Filtered, the log's head is read first and the page is taken
        up to it, so the position moves past events that did not match (with nothing new: one small
        query)."""
        if not self.topics:
            found = self.recorder.select_notifications(position + 1, self.page_size, stop=stop)
            more = len(found) == self.page_size
            return Page(found, found[-1].id if found else position, more)
        head = self.recorder.max_notification_id() or 0
        if stop is not None:
            head = min(head, stop)
        if head <= position:
            return Page((), position, False)
        found = self.recorder.select_notifications(
            position + 1, self.page_size, stop=head, topics=self.topics
        )
        if len(found) == self.page_size:
            return Page(found, found[-1].id, True)
        return Page(found, head, False)

    def pages_after(self, position: int, stop: int | None = None) -> Iterator[Page]:
        """Every page after `position` (up to `stop`), each read when the previous one is consumed;
        ends at the first page that is not full."""
        while True:
            page = self.page_after(position, stop)
            if page.notifications or page.position != position:
                yield page
            if not page.more:
                return
            position = page.position


class LogWakeup:
    """A follower's wake-up on PostgreSQL: a thread that LISTENs on the channel eventsourcing's
    PostgreSQL recorder NOTIFYs in every insert (`recorder.channel_name`), and calls `on_notify`
    (which must be thread-safe) when something was written by another session than the recorder's
    own (a notification names the server session that sent it). It carries no events: the follower
    reads the log after its own position as always, so a notification lost (the connection dropped,
    the thread restarting) costs latency until the follower's next pull, never an event.

    Why not the library's own `recorder.subscribe()`: its subscription selects the notifications
    itself, on threads and a connection of its own, from a position it keeps; the engine's store
    calls run on one store thread and its position is tracked, so only the wake-up is taken."""

    def __init__(
        self, recorder: Any, on_notify: Callable[[], object], *, retry_s: float = 1.0, wait_s: float = 0.2
    ) -> None:
        self.channel: str = recorder.channel_name
        self.datastore: Any = recorder.datastore
        # Sessions whose notifications are this engine's own saves (podsettle's recorder keeps
        # them): nothing to read there, so they wake nobody. Any other recorder: every one wakes.
        self.own_sessions: set[int] = getattr(recorder, "own_sessions", set())
        self.on_notify = on_notify
        self.retry_s = retry_s
        self.wait_s = wait_s  # the longest wait for a notification before `stop` is looked at again
        self.notified = 0
        self.own = 0  # notifications of this engine's own saves, left out
        self.listening = threading.Event()  # set while a LISTEN is in place
        self._stopped = threading.Event()
        # A channel of this listener's own, on which `stop` wakes it (it waits on its connection).
        self._stop_channel = f"podsettle_stop_{uuid.uuid4().hex}"
        self._thread = threading.Thread(target=self._run, name="podsettle-listen", daemon=True)

    @classmethod
    def start(cls, recorder: ApplicationRecorder, on_notify: Callable[[], object]) -> LogWakeup | None:
        """Listening on `recorder`'s store, or None for a store that cannot notify (SQLite, memory)."""
        if not hasattr(recorder, "channel_name") or not hasattr(recorder, "datastore"):
            return None  # only eventsourcing's PostgreSQL recorder NOTIFYs (psycopg: an optional extra)
        wakeup = cls(recorder, on_notify)
        wakeup._thread.start()
        return wakeup

    def stop(self) -> None:
        """Stop listening, at once: the thread is woken on its own channel (it would otherwise
        notice only when its wait for a notification times out, a closing engine's last wait)."""
        self._stopped.set()
        if self.listening.is_set():
            from psycopg.sql import SQL, Identifier

            with contextlib.suppress(Exception), self.datastore.get_connection() as conn:
                conn.execute(SQL("NOTIFY {0}").format(Identifier(self._stop_channel)))
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from psycopg.sql import SQL, Identifier

        while not self._stopped.is_set():
            try:
                with self.datastore.get_connection() as conn:
                    conn.execute(SQL("LISTEN {0}").format(Identifier(self.channel)))
                    conn.execute(SQL("LISTEN {0}").format(Identifier(self._stop_channel)))
                    self.listening.set()
                    self.on_notify()  # anything written before the LISTEN took: look once
                    while not self._stopped.is_set():
                        # (the timeout bounds a stop that came before `listening` was set)
                        for note in conn.notifies(timeout=self.wait_s, stop_after=1):
                            if note.channel == self._stop_channel:
                                break
                            if note.pid in self.own_sessions:
                                self.own += 1
                                continue
                            self.notified += 1
                            self.on_notify()
            except Exception as error:  # the server went away: the follower's pulls go on meanwhile
                log.warning("follower.listen_failed", channel=self.channel, error=repr(error))
            finally:
                self.listening.clear()
            self._stopped.wait(self.retry_s)


class TrackedPosition:
    """A follower's position in the library's tracking table, under its name."""

    def __init__(self, recorder: TrackingRecorder, name: str) -> None:
        self.recorder = recorder
        self.name = name

    @classmethod
    def open(cls, factory: InfrastructureFactory[TrackingRecorder], name: str) -> TrackedPosition:
        """The tracking table of `factory`'s store, created when missing. Two followers starting
        together on a new store may both create it: the library then raises `IntegrityError` (a
        duplicate type) or, on PostgreSQL, `InternalError` ("tuple concurrently updated") for the
        second, and the table exists."""
        for attempt in range(3):
            try:
                return cls(factory.tracking_recorder(), name)
            except (IntegrityError, InternalError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get(self) -> int:
        return self.recorder.max_tracking_id(self.name) or 0

    def record(self, position: int) -> None:
        """Move the position forward; a position another follower of the same name recorded first
        (an `IntegrityError`) is the same fact, and is left as it is."""
        with contextlib.suppress(IntegrityError):
            self.recorder.insert_tracking(Tracking(self.name, position))
