"""The study date and priority of each instance, and the index the lease order reads.

``instances.study_date`` is the StudyDate of the instance's study (``YYYYMMDD``; empty when
the source did not give it, so that both databases sort unknown dates alike: PostgreSQL
puts NULLs last where SQLite puts them first). ``instances.priority`` is raised by
`migrator prioritize`. Leases take whole studies in the job's order (priority, then study
date, then study), read from ``ix_instances_order`` in index order whichever way the date
goes, so that a lease stays a short index walk on large jobs; ``next_attempt_at`` closes
the index so that rows waiting for a retry are passed over without reading the table.
Rows listed before this revision get an empty date and priority 0: they keep the order
they were listed in.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ORDER_COLUMNS = ["job_id", "state", "priority", "study_date", "study_uid", "id", "next_attempt_at"]


def upgrade() -> None:
    op.add_column("instances", sa.Column("study_date", sa.Text, nullable=False, server_default=""))
    op.add_column(
        "instances", sa.Column("priority", sa.Integer, nullable=False, server_default="0")
    )
    op.create_index("ix_instances_order", "instances", ORDER_COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_instances_order", "instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("priority")
        batch.drop_column("study_date")
