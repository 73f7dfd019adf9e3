"""The egress gateway's audit log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-02

Written out in full (not imported from ``tables.py``) so that it stays what
it was when later revisions change the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("candidate_id", sa.String(64)),
        sa.Column("sandbox_id", sa.String(128), nullable=False),
        sa.Column("time", TZ, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("port", sa.Integer),
        sa.Column("method", sa.String(32)),
        sa.Column("path", sa.Text),
        sa.Column("status", sa.Integer),
        sa.Column("bytes_up", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("bytes_down", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_audit_run_id", "audit", ["run_id", "id"])


def downgrade() -> None:
    op.drop_table("audit")
