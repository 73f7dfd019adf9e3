"""SQLAlchemy models of the run database.

The schema itself is owned by the Alembic revisions in ``migrations/versions``;
these models must match them (``tests/test_store.py`` compares the two), so a
change here always comes with a new revision.

Portable on purpose (SQLite and PostgreSQL): JSON is stored as text we encode
ourselves, times as UTC, money as integer micro-dollars.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Row ids: 64-bit on PostgreSQL (a hosted service outgrows 2^31 evaluations); SQLite
# needs plain INTEGER for an auto-incrementing rowid key, and it is 64-bit there anyway.
RowId = BigInteger().with_variant(Integer(), "sqlite")


def _run_fk() -> ForeignKey:
    return ForeignKey("runs.id", ondelete="CASCADE")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite keeps no zone, so values are normalised to UTC on the way in and
    the zone is put back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JSONText(TypeDecorator[Any]):
    """JSON encoded by us into a TEXT column: identical bytes on every backend.

    Values that JSON cannot encode (a user program's odd output) are stored as
    their ``repr`` rather than failing the write.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return json.dumps(value, default=repr, ensure_ascii=False)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


class Base(DeclarativeBase):
    pass


class RunTable(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    repo_path: Mapped[str] = mapped_column(Text, nullable=False)
    config_json: Mapped[Any] = mapped_column(JSONText, nullable=False)
    base_commit: Mapped[str] = mapped_column(String(64), nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    metric_calls: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    iteration: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    best_candidate_id: Mapped[str | None] = mapped_column(String(64))
    seed_score: Mapped[float | None] = mapped_column(Float)
    best_score: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CandidateTable(Base):
    __tablename__ = "candidates"

    run_id: Mapped[str] = mapped_column(String(64), _run_fk(), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parents: Mapped[Any] = mapped_column(JSONText, nullable=False)
    components: Mapped[Any] = mapped_column(JSONText, nullable=False)
    commit: Mapped[str] = mapped_column(String(64), nullable=False)
    branch: Mapped[str | None] = mapped_column(Text)
    change_type: Mapped[str] = mapped_column(String(16), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    iteration: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    val_score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class EvaluationTable(Base):
    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_run_candidate_split", "run_id", "candidate_id", "split"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), _run_fk(), nullable=False)
    candidate_id: Mapped[str] = mapped_column(String(64), nullable=False)
    split: Mapped[str] = mapped_column(String(8), nullable=False)
    example_index: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    feedback: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    output: Mapped[Any] = mapped_column(JSONText, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    batch_id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class EventTable(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), _run_fk(), nullable=False)
    time: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    kind: Mapped[str] = mapped_column(String(64), nullable=False)
    data: Mapped[Any] = mapped_column(JSONText, nullable=False)


class UsageTable(Base):
    """Append-only ledger, one row per model call; idempotent on the provider's request id.

    A plain unique constraint suffices for "unique where request_id is not
    null": SQLite and PostgreSQL both treat NULLs as distinct in it.
    """

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("run_id", "request_id", name="uq_usage_run_request"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), _run_fk(), nullable=False)
    candidate_id: Mapped[str | None] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(16), nullable=False)
    model: Mapped[str] = mapped_column(Text, nullable=False)
    input_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    cost_micro_usd: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    request_id: Mapped[str | None] = mapped_column(String(255))
    time: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class TranscriptTable(Base):
    __tablename__ = "transcripts"
    __table_args__ = (Index("ix_transcripts_run_candidate", "run_id", "candidate_id"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), _run_fk(), nullable=False)
    candidate_id: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(64), nullable=False)
    content: Mapped[Any] = mapped_column(JSONText, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class AuditTable(Base):
    """The egress gateway's log: one row per request a sandbox made, allowed or blocked."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_run_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), _run_fk(), nullable=False)
    candidate_id: Mapped[str | None] = mapped_column(String(64))
    sandbox_id: Mapped[str] = mapped_column(String(128), nullable=False)
    time: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    host: Mapped[str] = mapped_column(Text, nullable=False)
    port: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str | None] = mapped_column(String(32))
    path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[int | None] = mapped_column(Integer)
    bytes_up: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    bytes_down: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    decision: Mapped[str] = mapped_column(String(8), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
