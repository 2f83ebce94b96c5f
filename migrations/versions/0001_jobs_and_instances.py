"""Jobs and one row per instance.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("options", sa.Text, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("listing_cursor", sa.Text),
        sa.Column("listing_done", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("changes_seq", sa.BigInteger),
    )
    op.create_table(
        "instances",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("source_key", sa.Text, nullable=False),
        sa.Column("orthanc_id", sa.String(44)),
        sa.Column("sop_uid", sa.String(64)),
        sa.Column("study_uid", sa.String(64)),
        sa.Column("series_uid", sa.String(64)),
        sa.Column("path", sa.Text),
        sa.Column("size", sa.BigInteger),
        sa.Column("md5", sa.String(32)),
        sa.Column("has_pixels", sa.Boolean),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(120)),
        sa.Column("lease_expires", sa.Float),
        sa.Column("target_status", sa.String(20)),
        sa.Column("http_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float),
        sa.UniqueConstraint("job_id", "source_key", name="uq_instances_job_source_key"),
    )
    op.create_index("ix_instances_lease", "instances", ["job_id", "state", "next_attempt_at", "id"])
    op.create_index("ix_instances_orthanc_id", "instances", ["job_id", "orthanc_id"])
    op.create_index("ix_instances_sent_at", "instances", ["job_id", "sent_at"])


def downgrade() -> None:
    op.drop_table("instances")
    op.drop_table("jobs")
