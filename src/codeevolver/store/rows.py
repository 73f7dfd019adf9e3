"""Frozen copies of database rows handed out by the store.

Callers get plain dataclasses, never ORM objects, so nothing they hold is tied
to a session or a thread and nothing they change can leak back into the DB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from codeevolver.types import Candidate, ExampleResult

RUN_STATUSES = frozenset({"running", "cancelling", "finished", "stopped", "failed", "cancelled"})
TERMINAL_RUN_STATUSES = frozenset({"finished", "stopped", "failed", "cancelled"})
CANDIDATE_STATUSES = frozenset({"accepted", "rejected", "failed", "seed"})
SPLITS = frozenset({"train", "val"})
PURPOSES = frozenset({"task", "reflection", "agent"})
AUDIT_DECISIONS = frozenset({"allowed", "blocked"})


@dataclass(frozen=True)
class RunRow:
    id: str
    created_at: datetime
    updated_at: datetime
    status: str
    repo_path: str
    config: dict[str, Any]
    base_commit: str
    seed: int
    metric_calls: int
    iteration: int
    best_candidate_id: str | None
    seed_score: float | None
    best_score: float | None
    error: str | None
    finished_at: datetime | None


@dataclass(frozen=True)
class CandidateRow:
    run_id: str
    id: str
    parents: list[str]
    components: dict[str, str]
    commit: str
    branch: str | None
    change_type: str
    description: str
    status: str
    reason: str | None
    iteration: int
    val_score: float | None
    created_at: datetime

    def to_candidate(self) -> Candidate:
        """The engine's view of this candidate (copies, so edits stay local)."""
        return Candidate(
            id=self.id,
            components=dict(self.components),
            commit=self.commit,
            parents=list(self.parents),
            branch=self.branch,
            change_type=self.change_type,  # type: ignore[arg-type]
            description=self.description,
            iteration=self.iteration,
        )


@dataclass(frozen=True)
class EvaluationRow:
    id: int
    run_id: str
    candidate_id: str
    split: str
    example_index: int
    score: float
    feedback: str
    output: Any
    error: str | None
    batch_id: str
    created_at: datetime

    def to_result(self) -> ExampleResult:
        """Back to an ExampleResult; traces are not stored, so they come back empty."""
        return ExampleResult(
            index=self.example_index,
            score=self.score,
            feedback=self.feedback,
            output=self.output,
            error=self.error,
        )


@dataclass(frozen=True)
class EventRow:
    id: int
    run_id: str
    time: datetime
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class TranscriptRow:
    id: int
    run_id: str
    candidate_id: str
    kind: str
    content: Any
    created_at: datetime


@dataclass(frozen=True)
class UsageTotals:
    """Sums over a run's usage ledger; ``by_purpose`` holds the same sums per purpose."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    calls: int = 0
    by_purpose: dict[str, UsageTotals] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRow:
    """One request a sandbox sent through the egress gateway, allowed or blocked.

    The gateway builds these (``id`` None) and the store hands them back with
    their ``id``. ``method``/``path``/``status`` are None where the gateway could
    not see them (inside a TLS tunnel it does not intercept).
    """

    time: datetime
    run_id: str
    sandbox_id: str
    host: str
    port: int | None
    decision: str
    reason: str = ""
    candidate_id: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    id: int | None = None
