"""Audit: streaming replay of the event log through the aggregate's own code, tamper evidence,
a hash-chained export, and reconciliation with the escrow service.

    report = audit(app, read_model=model)          # report.ok, report.render(), report.to_json()
    summary = export(app, "log.jsonl")              # JSON Lines, each line chained to the one before
    report = audit_export("log.jsonl", seals=SEALS)  # no database (SEALS: podsettle.adapters.chain)
    report = await reconcile(app, escrow_gateway)   # report.ok, report.differences
"""

from podsettle.replay.audit import Auditor, AuditReport, Finding, InFlight, audit, waiting_on_service
from podsettle.replay.export import ExportSummary, audit_export, export
from podsettle.replay.reconcile import Difference, ReconcileReport, Waiting, reconcile, waiting_jobs
from podsettle.replay.source import Decoder, Seals

__all__ = [
    "AuditReport",
    "Auditor",
    "Decoder",
    "Difference",
    "ExportSummary",
    "Finding",
    "InFlight",
    "ReconcileReport",
    "Seals",
    "Waiting",
    "audit",
    "audit_export",
    "export",
    "reconcile",
    "waiting_jobs",
    "waiting_on_service",
]
