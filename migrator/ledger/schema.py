"""The ledger's tables, as SQLAlchemy Core metadata.

This describes the schema at the newest alembic revision, for building queries and for
creating a new ledger in one step (`db.create_schema`); a test checks that it is exactly
the schema the revisions in ``migrations/versions`` build.
Times are UNIX epoch seconds (floats): portable, cheap to compare. UIDs, names and owners
are unbounded text (revision 0006): Orthanc accepts UIDs longer than DICOM's 64 characters.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid; BIGINT would not autoincrement.
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

# The states in which a row keeps other copies of its instance from being leased; literal,
# because a partial index serves only queries that spell its condition the same way.
COPY_STATES_SQL = "state IN ('in_flight', 'sent')"

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("kind", String(20), nullable=False),
    # Display forms only: a password never gets here.
    Column("source", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("options", Text, nullable=False, server_default="{}"),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # JSON cursor of the source listing, so that an interrupted listing resumes.
    Column("listing_cursor", Text),
    Column("listing_done", Boolean, nullable=False, server_default="0"),
    # Source's /changes position taken before the listing started.
    Column("changes_seq", BigInteger),
    # Which worker lists the source of a shared job, and until when (revision 0003).
    Column("listing_owner", Text),
    Column("listing_expires", Float),
)

instances = Table(
    "instances",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("source_key", Text, nullable=False),
    Column("orthanc_id", String(44)),
    Column("sop_uid", Text),
    Column("study_uid", Text),
    Column("series_uid", Text),
    Column("path", Text),
    Column("size", BigInteger),
    Column("md5", String(32)),
    Column("has_pixels", Boolean),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False, server_default="0"),
    Column("lease_owner", Text),
    Column("lease_expires", Float),
    Column("target_status", String(20)),
    Column("http_status", Integer),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("sent_at", Float),
    # Outcome of `migrator verify` (revision 0003): match, missing, differ or error.
    Column("verify_result", String(10)),
    Column("verified_at", Float),
    Column("verify_detail", Text),
    # Revision 0007: the ID the target answered, when it differs from `orthanc_id`
    # (verify asks the target for this one).
    Column("target_id", String(44)),
    # Revision 0008: the study's StudyDate (YYYYMMDD; empty when not known, which sorts
    # alike in both databases) and the priority `migrator prioritize` raises.
    Column("study_date", Text, nullable=False, server_default=""),
    Column("priority", Integer, nullable=False, server_default="0"),
    UniqueConstraint("job_id", "source_key", name="uq_instances_job_source_key"),
    Index("ix_instances_lease", "job_id", "state", "next_attempt_at", "id"),
    # Revision 0008: the lease order (priority, study date either way, study, id), walked
    # in index order; `next_attempt_at` last, so that waiting rows are passed over in it.
    Index(
        "ix_instances_order",
        "job_id",
        "state",
        "priority",
        "study_date",
        "study_uid",
        "id",
        "next_attempt_at",
    ),
    # Revision 0005: "another copy of this instance is in flight or sent" in one lookup;
    # partial, so that listing (every row pending) does not pay for it.
    ix_copies := Index(
        "ix_instances_copies",
        "job_id",
        "orthanc_id",
        "state",
        sqlite_where=text(COPY_STATES_SQL),
    ),
    Index("ix_instances_sent_at", "job_id", "sent_at"),
    Index("ix_instances_verify", "job_id", "verify_result"),
    # Revision 0004: `status` reads sizes and error reasons from indexes only.
    Index("ix_instances_state_size", "job_id", "state", "size"),
    Index("ix_instances_state_error", "job_id", "state", "last_error"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("owner", Text, nullable=False, unique=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    # Process start time (Linux clock ticks since boot), to tell a dead pid from a reused one.
    Column("pid_start", BigInteger),
    Column("command", String(20), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("status", String(20), nullable=False),
    Column("sent", BigInteger, nullable=False, server_default="0"),
    Column("bytes", BigInteger, nullable=False, server_default="0"),
    # Refreshed with the heartbeat: transfers under way (rows leased ahead only wait in
    # the process's queue) and the concurrency in use.
    Column("transferring", Integer, nullable=False, server_default="0"),
    Column("concurrency", Integer),
    Index("ix_runs_job", "job_id", "status"),
)


def use_dialect(name: str) -> None:
    """Give the metadata the options of the dialect a new ledger is created with.

    The PostgreSQL form of the partial index is attached only when a PostgreSQL ledger is
    created: naming it in the declaration would import that dialect (~40 ms) at every
    start of the tool, SQLite ledgers included.
    """
    if name == "postgresql":
        ix_copies.dialect_kwargs["postgresql_where"] = text(COPY_STATES_SQL)


def pending_again(now: float) -> dict[str, Any]:
    """Column values that put an instance row back to `pending`: due now, with a fresh
    attempt budget."""
    return {"state": "pending", "attempts": 0, "next_attempt_at": 0.0, "updated_at": now}
