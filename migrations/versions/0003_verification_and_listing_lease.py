"""Verification results per instance, and a lease on a job's listing.

`verify` records per row whether the target holds the same bytes (match, missing, differ,
error). The listing lease lets one worker list a shared job while the others wait.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("verify_result", sa.String(10)))
        batch.add_column(sa.Column("verified_at", sa.Float))
        batch.add_column(sa.Column("verify_detail", sa.Text))
    op.create_index("ix_instances_verify", "instances", ["job_id", "verify_result"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("listing_owner", sa.String(120)))
        batch.add_column(sa.Column("listing_expires", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("listing_expires")
        batch.drop_column("listing_owner")
    op.drop_index("ix_instances_verify", "instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("verify_detail")
        batch.drop_column("verified_at")
        batch.drop_column("verify_result")
