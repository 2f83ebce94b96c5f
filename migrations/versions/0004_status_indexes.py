"""Indexes for `status` on large ledgers: bytes sent and error reasons per state.

Without them, `status` on a million rows reads every row of the table (sizes of sent rows,
last errors of failed ones); with them it reads the indexes only.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_state_size", "instances", ["job_id", "state", "size"])
    op.create_index("ix_instances_state_error", "instances", ["job_id", "state", "last_error"])


def downgrade() -> None:
    op.drop_index("ix_instances_state_error", "instances")
    op.drop_index("ix_instances_state_size", "instances")
