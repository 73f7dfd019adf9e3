"""Initial schema: runs, candidates, evaluations, events, usage, transcripts.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Written out in full (not imported from ``tables.py``) so that it stays what
it was when later revisions change the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _run_fk() -> sa.ForeignKey:
    return sa.ForeignKey("runs.id", ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("repo_path", sa.Text, nullable=False),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("base_commit", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("metric_calls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("iteration", sa.Integer, nullable=False, server_default="0"),
        sa.Column("best_candidate_id", sa.String(64)),
        sa.Column("seed_score", sa.Float),
        sa.Column("best_score", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("finished_at", TZ),
    )
    op.create_table(
        "candidates",
        sa.Column("run_id", sa.String(64), _run_fk(), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("parents", sa.Text, nullable=False),
        sa.Column("components", sa.Text, nullable=False),
        sa.Column("commit", sa.String(64), nullable=False),
        sa.Column("branch", sa.Text),
        sa.Column("change_type", sa.String(16), nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("iteration", sa.Integer, nullable=False, server_default="0"),
        sa.Column("val_score", sa.Float),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "evaluations",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), _run_fk(), nullable=False),
        sa.Column("candidate_id", sa.String(64), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("example_index", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("feedback", sa.Text, nullable=False, server_default=""),
        sa.Column("output", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_evaluations_run_candidate_split", "evaluations", ["run_id", "candidate_id", "split"])
    op.create_table(
        "events",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), _run_fk(), nullable=False),
        sa.Column("time", TZ, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_index("ix_events_run_id", "events", ["run_id", "id"])
    op.create_table(
        "usage",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), _run_fk(), nullable=False),
        sa.Column("candidate_id", sa.String(64)),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cost_micro_usd", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("request_id", sa.String(255)),
        sa.Column("time", TZ, nullable=False),
        sa.UniqueConstraint("run_id", "request_id", name="uq_usage_run_request"),
    )
    op.create_table(
        "transcripts",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), _run_fk(), nullable=False),
        sa.Column("candidate_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("content", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_transcripts_run_candidate", "transcripts", ["run_id", "candidate_id"])


def downgrade() -> None:
    for table in ("transcripts", "usage", "events", "evaluations", "candidates", "runs"):
        op.drop_table(table)
