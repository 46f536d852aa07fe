"""The replays' shortcut around `mutate` builds the same aggregates as the library's `mutate`."""

from __future__ import annotations

from typing import Any

import pytest

from podsettle.domain import EscrowJob
from podsettle.projections.apply import applier, creator
from tests.histories import OUTCOMES, Plan, open_job, steps


def recorded(outcome: str) -> list[Any]:
    job = open_job(Plan(f"apply-{outcome}", outcome))
    for save in steps(Plan(f"apply-{outcome}", outcome)):
        for command in save:
            command(job)
    return list(job.collect_events())


def state(job: EscrowJob) -> dict[str, Any]:
    found = dict(vars(job))
    found.pop("_pending_events")
    return found


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_applier_and_creator_build_what_mutate_builds(outcome: str) -> None:
    events = recorded(outcome)
    by_library: Any = None
    by_shortcut: Any = None
    for event in events:
        by_library = event.mutate(by_library)
        if by_shortcut is None:
            create = creator(type(event))
            assert create is not None
            by_shortcut = create(event)
        else:
            apply = applier(type(event))
            assert apply is not None, type(event)
            apply(by_shortcut, event)
        assert state(by_shortcut) == state(by_library)
    assert by_shortcut.violations(quiescent=True) == by_library.violations(quiescent=True)


def test_classes_with_their_own_mutate_or_apply_are_left_to_it() -> None:
    class Custom(EscrowJob.Funded):
        def apply(self, aggregate: Any) -> None:
            pass

    assert applier(Custom) is None
    assert creator(EscrowJob.Funded) is None
    assert applier(EscrowJob.Opened) is None
