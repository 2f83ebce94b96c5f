"""Read-only questions the views ask of the ledger: counts per state, the recent pace,
the top errors, the runs, one report page, sends per minute.

The views (`status`, `report`, the page) shape and print the answers; only this module
and the rest of the ledger package know the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, cast, func, select

from migrator.ledger.schema import instances, runs
from migrator.ledger.store import Ledger
from migrator.states import ALL_STATES, State, VerifyResult

# The columns of a report row, in order (`migrator report`).
REPORT_COLUMNS = (
    "source_key",
    "orthanc_id",
    "sop_uid",
    "study_uid",
    "series_uid",
    "state",
    "target_status",
    "http_status",
    "verify_result",
    "verify_detail",
    "attempts",
    "last_error",
    "size",
    "md5",
    "created_at",
    "updated_at",
    "sent_at",
    "verified_at",
    "target_id",
    "study_date",
)
_REPORTED = [instances.c.id, *(instances.c[name] for name in REPORT_COLUMNS)]


def job_counts(ledger: Ledger, job_id: int) -> dict[str, int]:
    """Rows per state, every state present (0 when empty)."""
    counts = {state.value: 0 for state in ALL_STATES}
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(instances.c.state, func.count())
            .where(instances.c.job_id == job_id)
            .group_by(instances.c.state)
        ).all()
    for state, count in rows:
        counts[state] = count
    return counts


def sent_bytes(ledger: Ledger, job_id: int) -> int:
    """Bytes of the job's rows that are `sent`."""
    with ledger.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.coalesce(func.sum(instances.c.size), 0)).where(
                    instances.c.job_id == job_id, instances.c.state == State.SENT.value
                )
            ).scalar_one()
        )


@dataclass
class Activity:
    """What a job did lately and who works on it (`job_activity`)."""

    recent: int  # rows sent since the window's start
    recent_bytes: int
    first_recent: float | None  # the first of those sends
    errors: list[Any]  # (state, last_error, n), most frequent first
    running: list[Any]  # the runs marked running (owner, command, host, pid, ...)
    held: dict[str | None, int]  # rows in flight per lease owner


def job_activity(ledger: Ledger, job_id: int, since: float, top_errors: int) -> Activity:
    """The job's sends since `since`, its `top_errors` most frequent errors (on rows
    that are pending again or ended badly), its running runs and the rows each holds."""
    c = instances.c
    problems = (State.REJECTED, State.FAILED, State.VANISHED, State.SKIPPED, State.PENDING)
    with ledger.engine.connect() as conn:
        recent, recent_bytes, first = conn.execute(
            select(func.count(), func.coalesce(func.sum(c.size), 0), func.min(c.sent_at)).where(
                c.job_id == job_id, c.sent_at >= since
            )
        ).one()
        errors = conn.execute(
            select(c.state, c.last_error, func.count().label("n"))
            .where(
                c.job_id == job_id,
                c.state.in_([s.value for s in problems]),
                c.last_error.is_not(None),
            )
            .group_by(c.state, c.last_error)
            .order_by(func.count().desc())
            .limit(top_errors)
        ).all()
        running = conn.execute(
            select(
                runs.c.owner,
                runs.c.command,
                runs.c.started_at,
                runs.c.heartbeat_at,
                runs.c.sent,
                runs.c.bytes,
                runs.c.host,
                runs.c.pid,
                runs.c.pid_start,
                runs.c.transferring,
                runs.c.concurrency,
            ).where(runs.c.job_id == job_id, runs.c.status == "running")
        ).all()
        held = dict(
            conn.execute(
                select(c.lease_owner, func.count())
                .where(c.job_id == job_id, c.state == State.IN_FLIGHT.value)
                .group_by(c.lease_owner)
            ).all()
        )
    return Activity(recent, recent_bytes, first, list(errors), list(running), held)


def report_page(
    ledger: Ledger,
    job_id: int,
    filters: Sequence[State | VerifyResult],
    after: int,
    limit: int,
) -> list[tuple[Any, ...]]:
    """Up to `limit` rows of the job after row id `after`, in id order, optionally only
    those in the given states or (sent, with the given verify results): each row is its
    id, then the `REPORT_COLUMNS`. Each page is its own short read transaction, so that
    an SQLite reader never pins an old snapshot while workers write."""
    c = instances.c
    states = [f.value for f in filters if isinstance(f, State)]
    results = [f.value for f in filters if isinstance(f, VerifyResult)]
    # `job_id + 0`: no index on job_id may serve this query. With one, SQLite reads the
    # whole job through it and sorts it for every page; without, it walks the primary key
    # from `after` (linear over the whole report).
    conditions = [(c.job_id + 0) == job_id]
    if states and results:
        conditions.append(
            (c.state.in_(states)) | ((c.state == State.SENT.value) & c.verify_result.in_(results))
        )
    elif states:
        conditions.append(c.state.in_(states))
    elif results:
        conditions.append((c.state == State.SENT.value) & c.verify_result.in_(results))
    query = select(*_REPORTED).where(*conditions, c.id > after).order_by(c.id).limit(limit)
    with ledger._read() as conn:
        return [tuple(row) for row in conn.execute(query).all()]


def sends_per_bucket(
    ledger: Ledger, job_id: int, since: float, bucket: int
) -> dict[int, tuple[int, float]]:
    """Per `bucket` seconds (epoch // bucket) from `since` on, for one job: instances
    sent and the first send in it."""
    c = instances.c
    # PostgreSQL rounds when casting to integer; SQLite truncates (and may lack floor()).
    if ledger.dialect == "postgresql":
        key = func.floor(c.sent_at / bucket).label("m")
    else:
        key = cast(c.sent_at / bucket, Integer).label("m")
    with ledger._read() as conn:
        rows = conn.execute(
            select(key, func.count(), func.min(c.sent_at))
            .where(c.job_id == job_id, c.sent_at >= since)
            .group_by(key)
        ).all()
    return {int(m): (n, float(first)) for m, n, first in rows}
