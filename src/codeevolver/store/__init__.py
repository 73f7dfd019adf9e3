"""The durable run store (SQLite or PostgreSQL, schema managed by Alembic)."""

from codeevolver.store.db import state_dir
from codeevolver.store.rows import (
    AuditRow,
    CandidateRow,
    EvaluationRow,
    EventRow,
    RunRow,
    TranscriptRow,
    UsageTotals,
)
from codeevolver.store.store import Store, new_run_id

__all__ = [
    "AuditRow",
    "CandidateRow",
    "EvaluationRow",
    "EventRow",
    "RunRow",
    "Store",
    "TranscriptRow",
    "UsageTotals",
    "new_run_id",
    "state_dir",
]
