"""`EscrowJob.Opened` at class_version 2 (the dialect and the refund path) reads the store release
0.1.0 wrote: its jobs come back with neither recorded (None: the exact fee rule their figures were
checked with, refunds by the default path), and the audit of that store still finds nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from podsettle import Settlements
from podsettle.domain import EscrowJob
from podsettle.domain.escrow_job import DEFAULT_REFUND_METHOD
from podsettle.replay import audit

FIXTURE = Path(__file__).parents[1] / "data" / "release-0.1.0"


def test_old_jobs_read_without_dialect_or_refund_path(tmp_path: Path) -> None:
    shutil.copyfile(FIXTURE / "store.db", tmp_path / "store.db")
    app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    assert EscrowJob.Opened.class_version == 2
    jobs = app.list_jobs()
    assert jobs and all(job.dialect is None and job.refund_method is None for job in jobs)
    assert all(not job.violations() for job in jobs)  # their figures pass the recheck by the exact rule
    assert DEFAULT_REFUND_METHOD == "timeout"
    assert audit(app).ok
