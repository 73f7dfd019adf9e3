"""The durable store of runs: what the engine must never lose to a crash.

Every write method commits before it returns, so ``kill -9`` right after a
call loses nothing. Each call has its own session, so engine threads may call
one Store concurrently. Money is integer micro-dollars in the DB and Decimal
in this API.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import URL, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from codeevolver.errors import RunNotFound, StoreError
from codeevolver.store import db
from codeevolver.store.rows import (
    AUDIT_DECISIONS,
    CANDIDATE_STATUSES,
    PURPOSES,
    RUN_STATUSES,
    SPLITS,
    TERMINAL_RUN_STATUSES,
    AuditRow,
    CandidateRow,
    EvaluationRow,
    EventRow,
    RunRow,
    TranscriptRow,
    UsageTotals,
)
from codeevolver.store.tables import (
    AuditTable,
    Base,
    CandidateTable,
    EvaluationTable,
    EventTable,
    RunTable,
    TranscriptTable,
    UsageTable,
)
from codeevolver.types import Candidate, ExampleResult, UsageRecord

_USAGE = Base.metadata.tables["usage"]  # Core table: dialect upserts take it as-is
_RUN_FIELDS = frozenset(
    {
        "status", "repo_path", "config", "base_commit", "seed", "metric_calls", "iteration",
        "best_candidate_id", "seed_score", "best_score", "error", "finished_at",
    }
)  # fmt: skip
_CANDIDATE_FIELDS = frozenset(
    {
        "parents", "components", "commit", "branch", "change_type", "description", "status",
        "reason", "iteration", "val_score",
    }
)  # fmt: skip


def new_run_id() -> str:
    """A run id like ``r-20261203-1a2b3c``: sortable by UTC day, short enough to type."""
    return f"r-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"


def _check(name: str, value: str, allowed: frozenset[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, not {value!r}")


def _check_fields(fields: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")


class Store:
    """Runs, candidates, evaluations, events, usage, transcripts and the egress audit log, in SQLite or PostgreSQL."""

    def __init__(self, url: str | URL) -> None:
        """Open (creating if needed) the DB at ``url`` and migrate it to the current schema."""
        self.url = db.parse_url(url)
        self.location = db.describe(self.url)
        if self.url.get_backend_name() == "sqlite" and not db.is_memory_sqlite(self.url):
            db.ensure_writable_dir(Path(str(self.url.database)).resolve().parent)
        self._engine = db.make_engine(self.url)
        self._write_engine = self._engine.execution_options(**{db.WRITE_OPTION: True})
        # An in-memory DB is one shared connection: its transactions must not interleave.
        self._lock: AbstractContextManager[Any] = threading.RLock() if db.is_memory_sqlite(self.url) else nullcontext()
        try:
            db.migrate(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def for_repo(cls, repo_path: str | Path) -> Store:
        """The store of a repository, ``<repo>/.codeevolver/runs.db``, created on first use."""
        directory = db.state_dir(repo_path)
        db.ensure_writable_dir(directory, git_ignored=True)
        return cls(URL.create("sqlite", database=str(directory / db.DB_FILE_NAME)))

    @classmethod
    def open_existing(cls, repo_path: str | Path) -> Store:
        """The store of a repository that already has runs; creates nothing on disk otherwise."""
        path = db.db_path(repo_path)
        if not path.is_file():
            raise StoreError(
                f"no CodeEvolver runs in {Path(repo_path).resolve()}",
                fix="run `codeevolver optimize` first",
            )
        return cls(URL.create("sqlite", database=str(path)))

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    # -- sessions and errors ---------------------------------------------------------------

    @contextmanager
    def _session(self, *, write: bool = False, run_id: str | None = None) -> Iterator[Session]:
        """One transaction, committed on exit; DB errors become StoreError/RunNotFound."""
        with self._lock:
            try:
                with Session(self._write_engine if write else self._engine) as s, s.begin():
                    yield s
            except IntegrityError as exc:
                if run_id is not None and not self._run_exists(run_id):
                    raise self._no_run(run_id) from exc
                raise StoreError(f"{self.location} refused a write: {exc.orig}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(
                    f"database {self.location} failed: {getattr(exc, 'orig', None) or exc}",
                    fix="check disk space and permissions, or that the database server is up",
                ) from exc

    def _run_exists(self, run_id: str) -> bool:
        with Session(self._engine) as s:
            return s.get(RunTable, run_id) is not None

    def _no_run(self, run_id: str) -> RunNotFound:
        return RunNotFound(f"no run {run_id!r} in {self.location}", fix="list runs with `codeevolver runs`")

    def _no_candidate(self, run_id: str, cand_id: str) -> RunNotFound:
        """Says which is missing, the run or the candidate; call it outside any session."""
        if not self._run_exists(run_id):
            return self._no_run(run_id)
        return RunNotFound(
            f"no candidate {cand_id!r} in run {run_id!r} in {self.location}",
            fix="check the candidate id against the run's candidate list",
        )

    # -- runs ------------------------------------------------------------------------------

    def create_run(self, config: dict[str, Any], repo_path: str, base_commit: str, seed: int) -> str:
        """Record a new running run and return its id."""
        with self._session(write=True) as s:
            run_id = new_run_id()
            while s.get(RunTable, run_id) is not None:  # 24 random bits per day: rare, not impossible
                run_id = new_run_id()
            t = db.now()
            s.add(
                RunTable(
                    id=run_id, created_at=t, updated_at=t, status="running", repo_path=str(repo_path),
                    config_json=config, base_commit=base_commit, seed=seed, metric_calls=0, iteration=0,
                )
            )  # fmt: skip
        return run_id

    def get_run(self, run_id: str) -> RunRow:
        with self._session() as s:
            row = s.get(RunTable, run_id)
            if row is None:
                raise self._no_run(run_id)
            return _run_row(row)

    def list_runs(self, repo_path: str | None = None) -> list[RunRow]:
        """All runs, newest first (only those of ``repo_path`` when given)."""
        query = select(RunTable).order_by(RunTable.created_at.desc(), RunTable.id.desc())
        if repo_path is not None:
            query = query.where(RunTable.repo_path == str(repo_path))
        with self._session() as s:
            return [_run_row(r) for r in s.scalars(query)]

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set columns of a run; ``config`` takes a dict.

        A terminal ``status`` stamps ``finished_at`` and ``running`` clears it,
        unless ``finished_at`` is given too.
        """
        _check_fields(fields, _RUN_FIELDS)
        values = dict(fields)
        if "status" in values:
            _check("status", values["status"], RUN_STATUSES)
            if "finished_at" not in values:
                values["finished_at"] = db.now() if values["status"] in TERMINAL_RUN_STATUSES else None
        if "config" in values:
            values["config_json"] = values.pop("config")
        values["updated_at"] = db.now()
        with self._session(write=True) as s:
            result = s.execute(update(RunTable).where(RunTable.id == run_id).values(**values))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise self._no_run(run_id)

    # -- candidates ------------------------------------------------------------------------

    def add_candidate(
        self,
        run_id: str,
        cand: Candidate,
        status: str,
        reason: str | None = None,
        val_score: float | None = None,
    ) -> None:
        _check("status", status, CANDIDATE_STATUSES)
        with self._session(write=True, run_id=run_id) as s:
            if s.get(CandidateTable, (run_id, cand.id)) is not None:
                raise StoreError(f"candidate {cand.id!r} already exists in run {run_id!r}")
            s.add(
                CandidateTable(
                    run_id=run_id, id=cand.id, parents=list(cand.parents), components=dict(cand.components),
                    commit=cand.commit, branch=cand.branch, change_type=cand.change_type,
                    description=cand.description, status=status, reason=reason,
                    iteration=cand.iteration, val_score=val_score, created_at=db.now(),
                )
            )  # fmt: skip

    def update_candidate(self, run_id: str, cand_id: str, **fields: Any) -> None:
        _check_fields(fields, _CANDIDATE_FIELDS)
        if "status" in fields:
            _check("status", fields["status"], CANDIDATE_STATUSES)
        with self._session(write=True) as s:
            result = s.execute(
                update(CandidateTable)
                .where(CandidateTable.run_id == run_id, CandidateTable.id == cand_id)
                .values(**fields)
            )
            found = result.rowcount > 0  # type: ignore[attr-defined]
        if not found:
            raise self._no_candidate(run_id, cand_id)

    def get_candidate(self, run_id: str, cand_id: str) -> CandidateRow:
        with self._session() as s:
            row = s.get(CandidateTable, (run_id, cand_id))
            found = None if row is None else _candidate_row(row)
        if found is None:
            raise self._no_candidate(run_id, cand_id)
        return found

    def list_candidates(self, run_id: str, status: str | None = None) -> list[CandidateRow]:
        """A run's candidates in creation order, optionally only those with ``status``."""
        query = (
            select(CandidateTable)
            .where(CandidateTable.run_id == run_id)
            .order_by(CandidateTable.created_at, CandidateTable.id)
        )
        if status is not None:
            query = query.where(CandidateTable.status == status)
        with self._session() as s:
            return [_candidate_row(r) for r in s.scalars(query)]

    # -- evaluations -----------------------------------------------------------------------

    def add_evaluations(
        self, run_id: str, candidate_id: str, split: str, results: list[ExampleResult], batch_id: str
    ) -> int:
        """Record results and count them as metric calls, atomically; return the run's new total."""
        _check("split", split, SPLITS)
        t = db.now()
        with self._session(write=True, run_id=run_id) as s:
            # The UPDATE first: it locks the run row (PostgreSQL) and proves the run exists.
            bumped = s.execute(
                update(RunTable)
                .where(RunTable.id == run_id)
                .values(metric_calls=RunTable.metric_calls + len(results), updated_at=t)
            )
            if bumped.rowcount == 0:  # type: ignore[attr-defined]
                raise self._no_run(run_id)
            if results:
                s.execute(
                    insert(EvaluationTable),
                    [
                        {
                            "run_id": run_id, "candidate_id": candidate_id, "split": split,
                            "example_index": r.index, "score": float(r.score), "feedback": r.feedback or "",
                            "output": r.output, "error": r.error, "batch_id": batch_id, "created_at": t,
                        }
                        for r in results
                    ],
                )  # fmt: skip
            total = s.scalar(select(RunTable.metric_calls).where(RunTable.id == run_id))
        return int(total or 0)

    def val_scores(self, run_id: str) -> dict[str, dict[int, float]]:
        """Candidate id -> example index -> valset score, the latest one where an example was redone."""
        query = (
            select(EvaluationTable.candidate_id, EvaluationTable.example_index, EvaluationTable.score)
            .where(EvaluationTable.run_id == run_id, EvaluationTable.split == "val")
            .order_by(EvaluationTable.id)
        )
        scores: dict[str, dict[int, float]] = {}
        with self._session() as s:
            for cand_id, index, score in s.execute(query):
                scores.setdefault(cand_id, {})[index] = score
        return scores

    def evaluations(self, run_id: str, candidate_id: str, split: str | None = None) -> list[EvaluationRow]:
        query = (
            select(EvaluationTable)
            .where(EvaluationTable.run_id == run_id, EvaluationTable.candidate_id == candidate_id)
            .order_by(EvaluationTable.id)
        )
        if split is not None:
            query = query.where(EvaluationTable.split == split)
        with self._session() as s:
            return [_evaluation_row(r) for r in s.scalars(query)]

    # -- events ----------------------------------------------------------------------------

    def add_event(self, run_id: str, kind: str, data: dict[str, Any]) -> int:
        """Append an event; returns its id (what a follower passes as ``after_id`` next)."""
        with self._session(write=True, run_id=run_id) as s:
            row = EventTable(run_id=run_id, time=db.now(), kind=kind, data=data)
            s.add(row)
            s.flush()
            return row.id

    def events(self, run_id: str, after_id: int = 0, limit: int | None = None) -> list[EventRow]:
        query = (
            select(EventTable)
            .where(EventTable.run_id == run_id, EventTable.id > after_id)
            .order_by(EventTable.id)
            .limit(limit)
        )
        with self._session() as s:
            return [EventRow(r.id, r.run_id, r.time, r.kind, r.data) for r in s.scalars(query)]

    # -- usage -----------------------------------------------------------------------------

    def add_usage(self, rec: UsageRecord) -> bool:
        """Append a ledger row; False (and no change) when its request id is already recorded."""
        if not rec.run_id:
            raise ValueError("UsageRecord.run_id is required to store usage")
        _check("purpose", rec.purpose, PURPOSES)
        values = {
            "run_id": rec.run_id, "candidate_id": rec.candidate_id, "purpose": rec.purpose,
            "model": rec.model, "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
            "cached_tokens": rec.cached_tokens, "cost_micro_usd": db.to_micro(rec.cost_usd),
            "request_id": rec.request_id, "time": db.now(),
        }  # fmt: skip
        with self._session(write=True, run_id=rec.run_id) as s:
            dialect = s.get_bind().dialect.name
            if dialect in ("sqlite", "postgresql"):
                ins = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(_USAGE)
                stmt = ins.values(**values).on_conflict_do_nothing(index_elements=["run_id", "request_id"])
                return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]
            duplicate = rec.request_id is not None and s.scalar(
                select(UsageTable.id).where(UsageTable.run_id == rec.run_id, UsageTable.request_id == rec.request_id)
            )
            if duplicate:
                return False
            s.execute(insert(_USAGE).values(**values))
            return True

    def usage_totals(self, run_id: str) -> UsageTotals:
        """Tokens, exact cost and call count of a run, overall and per purpose."""
        query = (
            select(
                UsageTable.purpose,
                func.sum(UsageTable.input_tokens),
                func.sum(UsageTable.output_tokens),
                func.sum(UsageTable.cached_tokens),
                func.sum(UsageTable.cost_micro_usd),
                func.count(),
            )
            .where(UsageTable.run_id == run_id)
            .group_by(UsageTable.purpose)
        )
        by_purpose: dict[str, UsageTotals] = {}
        sums = [0, 0, 0, 0, 0]
        with self._session() as s:
            for purpose, *parts in s.execute(query):
                ints = [int(p or 0) for p in parts]
                sums = [a + b for a, b in zip(sums, ints, strict=True)]
                by_purpose[purpose] = UsageTotals(ints[0], ints[1], ints[2], db.from_micro(ints[3]), ints[4])
        return UsageTotals(sums[0], sums[1], sums[2], db.from_micro(sums[3]), sums[4], by_purpose)

    # -- egress audit ----------------------------------------------------------------------

    def add_audit(self, rows: AuditRow | Iterable[AuditRow]) -> int:
        """Append gateway audit rows in one transaction (the gateway batches); returns how many."""
        batch = [rows] if isinstance(rows, AuditRow) else list(rows)
        for row in batch:
            _check("decision", row.decision, AUDIT_DECISIONS)
        if not batch:
            return 0
        values = [
            {
                "run_id": r.run_id, "candidate_id": r.candidate_id, "sandbox_id": r.sandbox_id, "time": r.time,
                "host": r.host, "port": r.port, "method": r.method, "path": r.path, "status": r.status,
                "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "decision": r.decision, "reason": r.reason,
            }
            for r in batch
        ]  # fmt: skip
        runs = {r.run_id for r in batch}
        with self._session(write=True, run_id=next(iter(runs)) if len(runs) == 1 else None) as s:
            s.execute(insert(AuditTable), values)
        return len(batch)

    def audit(
        self,
        run_id: str,
        *,
        sandbox_id: str | None = None,
        decision: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditRow]:
        """A run's egress audit log in the order the gateway wrote it."""
        query = select(AuditTable).where(AuditTable.run_id == run_id, AuditTable.id > after_id)
        if sandbox_id is not None:
            query = query.where(AuditTable.sandbox_id == sandbox_id)
        if decision is not None:
            query = query.where(AuditTable.decision == decision)
        with self._session() as s:
            return [_audit_row(r) for r in s.scalars(query.order_by(AuditTable.id).limit(limit))]

    # -- transcripts -----------------------------------------------------------------------

    def add_transcript(self, run_id: str, candidate_id: str, kind: str, content: Any) -> int:
        """Store one piece of an agent transcript (``kind`` says which: reflection, coding ...)."""
        with self._session(write=True, run_id=run_id) as s:
            row = TranscriptTable(
                run_id=run_id, candidate_id=candidate_id, kind=kind, content=content, created_at=db.now()
            )
            s.add(row)
            s.flush()
            return row.id

    def transcript(self, run_id: str, candidate_id: str) -> list[TranscriptRow]:
        """A candidate's transcript pieces in the order they were stored."""
        query = (
            select(TranscriptTable)
            .where(TranscriptTable.run_id == run_id, TranscriptTable.candidate_id == candidate_id)
            .order_by(TranscriptTable.id)
        )
        with self._session() as s:
            return [
                TranscriptRow(r.id, r.run_id, r.candidate_id, r.kind, r.content, r.created_at) for r in s.scalars(query)
            ]


def _run_row(r: RunTable) -> RunRow:
    return RunRow(
        id=r.id, created_at=r.created_at, updated_at=r.updated_at, status=r.status, repo_path=r.repo_path,
        config=r.config_json, base_commit=r.base_commit, seed=r.seed, metric_calls=r.metric_calls,
        iteration=r.iteration, best_candidate_id=r.best_candidate_id, seed_score=r.seed_score,
        best_score=r.best_score, error=r.error, finished_at=r.finished_at,
    )  # fmt: skip


def _candidate_row(r: CandidateTable) -> CandidateRow:
    return CandidateRow(
        run_id=r.run_id, id=r.id, parents=list(r.parents), components=dict(r.components), commit=r.commit,
        branch=r.branch, change_type=r.change_type, description=r.description, status=r.status,
        reason=r.reason, iteration=r.iteration, val_score=r.val_score, created_at=r.created_at,
    )  # fmt: skip


def _evaluation_row(r: EvaluationTable) -> EvaluationRow:
    return EvaluationRow(
        id=r.id, run_id=r.run_id, candidate_id=r.candidate_id, split=r.split,
        example_index=r.example_index, score=r.score, feedback=r.feedback, output=r.output,
        error=r.error, batch_id=r.batch_id, created_at=r.created_at,
    )  # fmt: skip


def _audit_row(r: AuditTable) -> AuditRow:
    return AuditRow(
        id=r.id, time=r.time, run_id=r.run_id, candidate_id=r.candidate_id, sandbox_id=r.sandbox_id,
        host=r.host, port=r.port, method=r.method, path=r.path, status=r.status, bytes_up=r.bytes_up,
        bytes_down=r.bytes_down, decision=r.decision, reason=r.reason,
    )  # fmt: skip
