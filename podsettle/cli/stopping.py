"""What a person sees while a command moves money: one readable line when a service stops answering
and one when it answers again (not one per retry), and a clean stop on SIGINT or SIGTERM.

The engine logs every retry as a structured warning; those JSON lines are for operators who asked
for them with PODSETTLE_LOG_LEVEL. Without it, this watch turns them into condition changes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import typer

ESCROW, RUNPOD = "the escrow service", "RunPod"
# Warnings the engine writes when a call could not reach a service (it retries on its own).
_TROUBLE = frozenset({"effect.retry", "effect.confirm_later", "effect.outcome_unknown"})
_RUNPOD_TROUBLE = frozenset({"runpod.status_unavailable", "runpod.cancel_failed"})
# Info lines that only a call the service answered can produce.
_ANSWERED = {
    "escrow.funded": ESCROW,
    "escrow.released": ESCROW,
    "escrow.refund_pending": ESCROW,
    "escrow.refunded": ESCROW,
    "runpod.started": RUNPOD,
    "runpod.progress": RUNPOD,
}
_RUNPOD_STEPS = frozenset({"start", "cancel"})
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class OutageWatch:
    """A structlog processor (put first) that follows each service's condition from the engine's
    lines and prints a line when it changes; it drops the lines below `show_level`."""

    show_level: int
    echo: Callable[[str], None] = field(default=lambda line: typer.echo(line, err=True))
    clock: Callable[[], float] = time.monotonic
    down_since: dict[str, float] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)

    def __call__(self, _: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event = event_dict.get("event")
        trouble = self._troubled_service(event, event_dict)
        if trouble is not None:
            self._down(trouble, str(event_dict.get("error") or "no answer"))
        elif event in _ANSWERED:
            self._back(_ANSWERED[event])
        if logging.getLevelNamesMapping().get(method.upper(), logging.WARNING) < self.show_level:
            raise structlog.DropEvent
        return event_dict

    @staticmethod
    def _troubled_service(event: Any, fields: MutableMapping[str, Any]) -> str | None:
        if event in _RUNPOD_TROUBLE:
            return RUNPOD
        if event in _TROUBLE:
            return RUNPOD if fields.get("step") in _RUNPOD_STEPS else ESCROW
        return None

    def _down(self, service: str, error: str) -> None:
        self.retries[service] = self.retries.get(service, 0) + 1
        if service not in self.down_since:
            self.down_since[service] = self.clock()
            shown = error if len(error) <= 100 else error[:97] + "..."
            self.echo(f"podsettle: {service} is not answering ({shown}); the jobs wait and retry")

    def _back(self, service: str) -> None:
        since = self.down_since.pop(service, None)
        if since is not None:
            retries = self.retries.pop(service, 0)
            self.echo(
                f"podsettle: {service} answers again (after {self.clock() - since:.0f} s, {retries} retries)"
            )


@contextmanager
def outage_lines(user_level: str | None) -> Iterator[OutageWatch]:
    """While the block runs: a service's condition changes as lines; the engine's JSON lines only at
    `user_level` (PODSETTLE_LOG_LEVEL when the user set it). Without it only critical ones: the
    engine logs every failed call (as an error when money was involved), and the command says in
    its own words what became of each job."""
    levels = logging.getLevelNamesMapping()
    watch = OutageWatch(show_level=levels.get((user_level or "CRITICAL").upper(), logging.WARNING))
    saved = structlog.get_config()
    # Info lines reach the watch (it needs them to see a service answer again); it drops what
    # the level would have dropped, so what is written is unchanged.
    structlog.configure(
        processors=[watch, *saved["processors"]],
        wrapper_class=structlog.make_filtering_bound_logger(min(logging.INFO, watch.show_level)),
    )
    try:
        yield watch
    finally:
        structlog.configure(processors=saved["processors"], wrapper_class=saved["wrapper_class"])


@dataclass
class Stop:
    """SIGINT or SIGTERM cancel the command's task once: the engine then saves what is queued and
    stops driving jobs (they stay in the log for `resume`). A second signal is not caught again."""

    signal: signal.Signals | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 130) if self.signal is not None else 0

    @contextmanager
    def catching(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(received: signal.Signals) -> None:
            if self.signal is None:
                self.signal = received
                for other in EXIT_CODES:
                    loop.remove_signal_handler(other)  # a second Ctrl-C interrupts at once
                task.cancel()

        for number in EXIT_CODES:
            loop.add_signal_handler(number, stop, number)
        try:
            yield
        finally:
            for number in EXIT_CODES:
                loop.remove_signal_handler(number)
