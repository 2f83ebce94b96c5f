"""The order in which a job's rows are leased, `migrator prioritize`, and progress counted
by study. Mixed into `Ledger`.

A job's order (``options["order"]``, fixed when the job is created) is one of:

- ``newest``: whole studies, the latest StudyDate first (undated studies last);
- ``oldest``: whole studies, the earliest StudyDate first (undated studies first);
- ``listing``: the order the source listed its instances in (jobs created before there
  was a choice).

Whatever the order, rows of a higher ``priority`` (raised by `prioritize`) go first, so
that running workers take them at their next lease. Each order is a walk of an index in
index order (``ix_instances_order``, or ``ix_instances_lease`` for ``listing``), never a
sort of the pending rows: ``newest`` walks ``ix_instances_order`` backwards in one query;
the others take the prioritized rows first (few, sorted) and then the rows of priority
0, forward.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, case, func, select, update

from migrator.ledger.schema import instances, jobs
from migrator.states import State

ORDER_NEWEST, ORDER_OLDEST, ORDER_LISTING = "newest", "oldest", "listing"
_PENDING = State.PENDING.value
_WAITING = (State.PENDING.value, State.IN_FLIGHT.value)
_FAILED = (State.REJECTED.value, State.FAILED.value)


@dataclass
class StudyProgress:
    """A job's studies by how far they got (rows without a study UID are not counted).

    ``complete``: every row settled and none refused or failed; ``partial``: some rows
    sent, some still to send; ``pending``: none sent yet; ``failed``: some row rejected
    or failed. ``latest_complete`` is the most recent StudyDate of a complete study;
    ``complete_since`` the earliest date from which every dated study is complete
    ("everything since then is on the target"), None when the newest is not.
    """

    complete: int = 0
    partial: int = 0
    pending: int = 0
    failed: int = 0
    latest_complete: str | None = None
    complete_since: str | None = None
    # The studies in order of StudyDate (newest first) with their counts, when asked for.
    studies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Every study counted."""
        return self.complete + self.partial + self.pending + self.failed

    def as_json(self) -> dict[str, Any]:
        """The JSON form (`status --json`, the page)."""
        return {
            "total": self.total,
            "complete": self.complete,
            "partial": self.partial,
            "pending": self.pending,
            "failed": self.failed,
            "latest_complete": _dashed(self.latest_complete),
            "complete_since": _dashed(self.complete_since),
        }


def _dashed(day: str | None) -> str | None:
    """``YYYYMMDD`` as ``YYYY-MM-DD`` (how people write it)."""
    return f"{day[:4]}-{day[4:6]}-{day[6:]}" if day else None


class OrderMixin:
    """Lease order, priorities and per-study progress (see the module docstring)."""

    _read: Any
    _write: Any

    def job_order(self, conn: Any, job_id: int) -> str:
        """The job's lease order, read once (it never changes for a job)."""
        # Kept per ledger object: a job's order is fixed when the job is created.
        orders: dict[int, str] = self.__dict__.setdefault("_orders", {})
        order = orders.get(job_id)
        if order is None:
            raw = conn.execute(select(jobs.c.options).where(jobs.c.id == job_id)).scalar()
            order = json.loads(raw or "{}").get("order") or ORDER_LISTING
            orders[job_id] = order
        return order

    def _due_rows(
        self, conn: Any, job_id: int, columns: list[Any], limit: int, now: float
    ) -> list[Any]:
        """Up to `limit` due pending rows (`columns`) in the job's lease order, locked on
        PostgreSQL (``FOR UPDATE SKIP LOCKED``)."""
        order = self.job_order(conn, job_id)
        c = instances.c
        due = select(*columns).where(c.job_id == job_id, c.state == _PENDING)
        # `+ 0`: the due time is checked on each row of the ordered walk; as a range it
        # would lead both databases to ix_instances_lease and a sort of every pending row.
        due_ordered = due.where(c.next_attempt_at + 0 <= now)
        if order == ORDER_NEWEST:
            # ix_instances_order backwards: priority, date, study, id all descending.
            return conn.execute(
                _locked(
                    due_ordered.order_by(
                        c.priority.desc(), c.study_date.desc(), c.study_uid.desc(), c.id.desc()
                    ),
                    limit,
                )
            ).all()
        if order == ORDER_OLDEST:
            first = (c.priority.desc(), c.study_date, c.study_uid, c.id)
            rest = due_ordered.where(c.priority == 0).order_by(c.study_date, c.study_uid, c.id)
        else:
            first = (c.priority.desc(), c.id)
            # Exactly the query of the listing order before priorities existed: walks
            # ix_instances_lease; a prioritized row it meets again is dropped below.
            rest = due.where(c.next_attempt_at <= now).order_by(c.next_attempt_at, c.id)
        rows: list[Any] = []
        # One index probe first: prioritized rows are rare, and their query (with the
        # copies lookup of each row) is then not run at all.
        prioritized = select(c.id).where(c.job_id == job_id, c.state == _PENDING, c.priority > 0)
        if conn.execute(prioritized.limit(1)).first() is not None:
            rows = conn.execute(
                _locked(due_ordered.where(c.priority > 0).order_by(*first), limit)
            ).all()
        if len(rows) < limit:
            taken = {row[0] for row in rows}
            more = conn.execute(_locked(rest, limit - len(rows) + len(taken))).all()
            rows += [row for row in more if row[0] not in taken][: limit - len(rows)]
        return rows

    def prioritize(
        self,
        job_id: int,
        *,
        study_uids: set[str] | None = None,
        since: str | None = None,
    ) -> int:
        """Move the job's pending rows of these studies (or of StudyDate `since` or later)
        ahead of every other: a priority above any given so far. Running workers see it
        at their next lease. Returns how many rows moved."""
        conditions = [instances.c.job_id == job_id, instances.c.state == _PENDING]
        if since is not None:
            conditions.append(instances.c.study_date >= since)
        moved = 0
        with self._write() as conn:
            top = conn.execute(
                select(func.max(instances.c.priority)).where(instances.c.job_id == job_id)
            ).scalar()
            level = (top or 0) + 1
            now = time.time()
            if study_uids is None:
                return conn.execute(
                    update(instances).where(*conditions).values(priority=level, updated_at=now)
                ).rowcount
            uids = sorted(study_uids)
            for start in range(0, len(uids), 500):
                moved += conn.execute(
                    update(instances)
                    .where(*conditions, instances.c.study_uid.in_(uids[start : start + 500]))
                    .values(priority=level, updated_at=now)
                ).rowcount
        return moved

    def study_progress(self, job_id: int, *, listing: bool = False) -> StudyProgress:
        """The job's studies counted by how far they got; with `listing`, each study's
        counts too (newest first)."""
        c = instances.c
        query = (
            select(
                c.study_uid,
                func.max(c.study_date),
                func.count(),
                func.sum(case((c.state == State.SENT.value, 1), else_=0)),
                func.sum(case((c.state.in_(_WAITING), 1), else_=0)),
                func.sum(case((c.state.in_(_FAILED), 1), else_=0)),
            )
            .where(c.job_id == job_id, c.study_uid.is_not(None))
            .group_by(c.study_uid)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        progress = StudyProgress()
        incomplete_dates: list[str] = []
        complete_dates: list[str] = []
        for uid, day, total, sent, waiting, failed in rows:
            if failed:
                kind = "failed"
            elif not waiting:
                kind = "complete"
            elif sent:
                kind = "partial"
            else:
                kind = "pending"
            setattr(progress, kind, getattr(progress, kind) + 1)
            if day:
                (complete_dates if kind == "complete" else incomplete_dates).append(day)
            if listing:
                progress.studies.append(
                    {
                        "study_uid": uid,
                        "study_date": _dashed(day),
                        "state": kind,
                        "instances": int(total),
                        "sent": int(sent or 0),
                    }
                )
        if complete_dates:
            progress.latest_complete = max(complete_dates)
            newest_open = max(incomplete_dates, default="")
            later = [d for d in complete_dates if d > newest_open]
            progress.complete_since = min(later) if later else None
        progress.studies.sort(key=lambda s: (s["study_date"] or "", s["study_uid"]), reverse=True)
        return progress


def _locked(query: Select[Any], limit: int) -> Select[Any]:
    """`query` limited, its rows locked for this lease on PostgreSQL (others skip them)."""
    return query.limit(limit).with_for_update(skip_locked=True)
