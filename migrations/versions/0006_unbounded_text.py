"""UIDs, owners, host and job names as unbounded text.

DICOM limits a UID to 64 characters, but Orthanc stores longer ones (a 76-character
SOPInstanceUID is accepted), and a job name built from a long folder path can pass 200:
in a PostgreSQL ledger a ``VARCHAR(n)`` column then stops every run with "value too
long". PostgreSQL changes ``varchar`` to ``text`` without rewriting the table. SQLite
does not enforce lengths, but the table is rebuilt (batch mode) so that its declared
types stay those of a new ledger; the partial index is dropped first and made again
after, since a rebuilt table would not keep its condition.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COPY_STATES = "state IN ('in_flight', 'sent')"

# table -> (column, old length)
COLUMNS: dict[str, list[tuple[str, int]]] = {
    "jobs": [("name", 200), ("listing_owner", 120)],
    "instances": [("sop_uid", 64), ("study_uid", 64), ("series_uid", 64), ("lease_owner", 120)],
    "runs": [("owner", 120), ("host", 255)],
}


def _retype(to_text: bool) -> None:
    op.drop_index("ix_instances_copies", "instances")
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for name, length in columns:
                old, new = sa.String(length), sa.Text()
                batch.alter_column(
                    name,
                    type_=new if to_text else old,
                    existing_type=old if to_text else new,
                    existing_nullable=name not in ("name", "owner", "host"),
                )
    op.create_index(
        "ix_instances_copies",
        "instances",
        ["job_id", "orthanc_id", "state"],
        sqlite_where=sa.text(COPY_STATES),
        postgresql_where=sa.text(COPY_STATES),
    )


def upgrade() -> None:
    _retype(to_text=True)


def downgrade() -> None:
    # Fails on PostgreSQL if a longer value was stored meanwhile (it would not fit).
    _retype(to_text=False)
