"""Read models fed from the event log with tracking: batch totals, worker earnings, endpoint spend,
jobs by state, timings and a compute-cost lower bound.

    model = ReadModel(app, "podsettle-views.db", gpu_second_price=Decimal("0.00016"))
    model.catch_up()
    model.batch_totals("batch-1").to_json()
"""

from podsettle.projections.read_model import (
    Earnings,
    EndpointSpend,
    Percentiles,
    ReadModel,
    Timings,
    is_job_topic,
)
from podsettle.projections.rows import JobRow, Totals, funded_at_after, row_of
from podsettle.projections.views import (
    CHECKPOINT_EVERY,
    GENESIS_DIGEST,
    Checkpoint,
    Projector,
    Tracking,
    ViewStore,
    log_step,
)

__all__ = [
    "CHECKPOINT_EVERY",
    "GENESIS_DIGEST",
    "Checkpoint",
    "Earnings",
    "EndpointSpend",
    "JobRow",
    "Percentiles",
    "Projector",
    "ReadModel",
    "Timings",
    "Totals",
    "Tracking",
    "ViewStore",
    "funded_at_after",
    "is_job_topic",
    "log_step",
    "row_of",
]
