"""The ID a target gave an instance, and what each run is doing right now.

``instances.target_id`` holds the Orthanc ID the target answered when it differs from the
one computed from the source (a target that changes identifiers on ingest), so that
`verify` asks the target for the instance it really holds. ``runs.transferring`` and
``runs.concurrency`` are refreshed with each heartbeat: how many transfers the process has
under way (rows it leased ahead are in flight in the ledger but only queued), and the
concurrency it uses at the moment.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("target_id", sa.String(44)))
    op.add_column("runs", sa.Column("transferring", sa.Integer, nullable=False, server_default="0"))
    op.add_column("runs", sa.Column("concurrency", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("concurrency")
        batch.drop_column("transferring")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("target_id")
