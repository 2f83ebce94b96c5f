"""Index only the rows that block another copy of their instance: in flight or sent.

A folder import leases a row only if no other row with its Orthanc ID is in flight or
sent. The index on (job_id, orthanc_id) it used had two costs: SQLite preferred the
(job_id, state) index for that check and then read every sent row of the job for each
candidate row; and every listed row paid a random insert into it (a third of the cost
of listing a large index). A partial index of the in-flight and sent rows, with their
state (so that it covers the lookup and SQLite picks it), answers the check in one
lookup and costs nothing while listing, when every row is pending.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COPY_STATES = "state IN ('in_flight', 'sent')"


def upgrade() -> None:
    op.drop_index("ix_instances_orthanc_id", "instances")
    op.create_index(
        "ix_instances_copies",
        "instances",
        ["job_id", "orthanc_id", "state"],
        sqlite_where=sa.text(COPY_STATES),
        postgresql_where=sa.text(COPY_STATES),
    )


def downgrade() -> None:
    op.drop_index("ix_instances_copies", "instances")
    op.create_index("ix_instances_orthanc_id", "instances", ["job_id", "orthanc_id"])
