"""The ledger: the only writer of instance state.

Every state change is a compare-and-set ``UPDATE ... WHERE state IN (:expected)``, with the
expected states taken from the transition table in `migrator.states`, so two workers can
never both move a row, and a row is never moved along an edge the state machine lacks.
Writes are batched: a worker reports many outcomes in one transaction.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from migrator.errors import LedgerError, UsageError
from migrator.ledger import db
from migrator.ledger.copies import CopiesMixin
from migrator.ledger.deletions import DeletionsMixin
from migrator.ledger.listed import insert_listed, listed_values
from migrator.ledger.order import OrderMixin
from migrator.ledger.runs import RunsMixin
from migrator.ledger.schema import instances, jobs, pending_again, runs
from migrator.ledger.supersede import (
    SUPERSEDED,
    TWIN_SENT,
    TWIN_STATE,
    SupersedeMixin,
)
from migrator.ledger.verification import VerifyMixin
from migrator.states import NEVER_SEND_REASONS, State, check_transition

# A row whose twin is in flight waits this long before it is looked at again.
TWIN_WAIT_SECONDS = 5.0
# Rounds of blocked candidates a lease clears before it gives up for this call.
_BLOCKED_ROUNDS = 20
# PostgreSQL: leases of one copy per instance take turns on this (namespace, job) lock.
COPIES_LEASE_LOCK = text("SELECT pg_advisory_xact_lock(7299, CAST(:job_id AS integer))")


@dataclass(frozen=True)
class Job:
    """A job row."""

    id: int
    name: str
    kind: str
    source: str
    target: str
    options: dict[str, Any]
    created_at: float
    listing_cursor: str | None
    listing_done: bool
    changes_seq: int | None


@dataclass(frozen=True)
class Lease:
    """One instance handed to a worker."""

    id: int
    source_key: str
    orthanc_id: str | None
    path: str | None
    size: int | None
    md5: str | None
    attempts: int


def _supersede(ids: Any, now: float) -> Any:
    """The pending rows among `ids` (a list parameter or a subquery) end skipped as
    superseded by another copy of their instance."""
    return (
        update(instances)
        .where(instances.c.id.in_(ids), instances.c.state == State.PENDING.value)
        .values(state=State.SKIPPED.value, last_error=SUPERSEDED, updated_at=now)
    )


class Listed(int):
    """How many listed rows `Ledger.save_listing` added; `to_send` counts those among them
    that are to be sent (not skipped as they were listed)."""

    to_send: int = 0


class Requeued(int):
    """How many rows `Ledger.retry` put back to pending; `kept` counts the skipped rows it
    left skipped, by reason (their files must never be sent)."""

    kept: dict[str, int]


class Leased(list[Lease]):
    """The leases of one `Ledger.lease` call, and how many copies it found superseded."""

    superseded: int = 0


@dataclass(frozen=True)
class Outcome:
    """What happened to one leased instance, to be recorded by `Ledger.record`."""

    id: int
    state: State
    target_status: str | None = None
    http_status: int | None = None
    error: str | None = None
    md5: str | None = None
    size: int | None = None
    next_attempt_at: float = 0.0
    # Give back the attempt this lease was charged (the endpoint was down, not the
    # instance at fault).
    refund: bool = False
    # The ID the target gave the instance, when it differs from the row's `orthanc_id`.
    target_id: str | None = None


@dataclass
class Activity:
    """What a run is doing right now, saved with its heartbeat for `status`: transfers
    under way (rows it leased ahead wait in its queue) and the concurrency it allows."""

    transferring: int = 0
    concurrency: int | None = None


def make_owner() -> str:
    """A unique worker identity: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Ledger(RunsMixin, VerifyMixin, CopiesMixin, SupersedeMixin, DeletionsMixin, OrderMixin):
    """A ledger database. Open with `Ledger.open`; all methods are synchronous."""

    def __init__(self, url: str, *, create: bool) -> None:
        self.display_url = db.display_url(url)
        self.engine = db.make_engine(url, must_exist=not create)
        db.check_revision(self.engine, create=create, url_for_messages=self.display_url)
        self.dialect = self.engine.dialect.name

    @classmethod
    def open(cls, url: str, *, create: bool = False) -> Ledger:
        """Open a ledger; `create` allows making a new one (SQLite file or empty database)."""
        return cls(url, create=create)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    # -- transactions ---------------------------------------------------------------------

    def _write(self) -> Any:
        try:
            conn = self.engine.connect().execution_options(immediate=True)
        except SQLAlchemyError as exc:
            reason = db.short_error(exc)
            raise LedgerError(f"ledger {self.display_url} is unusable: {reason}") from None
        return db.Transaction(conn, self.display_url)

    def _read(self) -> Any:
        try:
            conn = self.engine.connect()
        except SQLAlchemyError as exc:
            reason = db.short_error(exc)
            raise LedgerError(f"ledger {self.display_url} is unusable: {reason}") from None
        return db.Transaction(conn, self.display_url)

    def _insert(self, table: Any) -> Any:
        # The dialect's own insert (for ON CONFLICT), imported for the dialect in use only.
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        return dialect_insert(table)

    # -- jobs -----------------------------------------------------------------------------

    def get_job(self, name: str) -> Job | None:
        """The job called `name`, or None."""
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.name == name)).mappings().first()
        return _job(row) if row else None

    def list_jobs(self) -> list[Job]:
        """Every job, oldest first."""
        with self._read() as conn:
            rows = conn.execute(select(jobs).order_by(jobs.c.id)).mappings().all()
        return [_job(r) for r in rows]

    def ensure_job(
        self, name: str, kind: str, source: str, target: str, options: dict[str, Any]
    ) -> Job:
        """Create the job, or return the existing one if it moves the same data."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(select(jobs).where(jobs.c.name == name)).mappings().first()
            if row is None:
                conn.execute(
                    insert(jobs).values(
                        name=name,
                        kind=kind,
                        source=source,
                        target=target,
                        options=json.dumps(options, sort_keys=True),
                        created_at=now,
                        updated_at=now,
                        listing_done=False,
                    )
                )
                row = conn.execute(select(jobs).where(jobs.c.name == name)).mappings().one()
        job = _job(row)
        if (job.kind, _end(job.source), _end(job.target)) != (kind, _end(source), _end(target)):
            raise UsageError(
                f"job {name!r} is a {job.kind} job from {job.source} to {job.target}; "
                f"choose another --job name"
            )
        return job

    def save_listing(
        self,
        job_id: int,
        rows: Sequence[dict[str, Any]],
        cursor: str | None,
        *,
        done: bool = False,
        changes_seq: int | None = None,
    ) -> Listed:
        """Add listed instances (ignoring ones already there) and move the listing cursor,
        in one transaction so that a crash never loses or duplicates a page.

        Returns how many rows were new; its `to_send` how many of them are to be sent
        (not skipped as they were listed, as JSON summaries are): what progress counts.
        """
        now = time.time()
        added = Listed(0)
        # Rows to send and rows skipped go in two inserts, to count the former. The
        # parameters are built before the transaction: it holds the database's lock.
        to_send: list[tuple[Any, ...]] = []
        skipped: list[tuple[Any, ...]] = []
        pending, skipped_state = State.PENDING.value, State.SKIPPED.value
        for r in rows:
            state = r.get("state") or (skipped_state if r.get("skip_reason") else pending)
            params = (job_id, state, r.get("skip_reason"), now, now, *listed_values(r))
            (to_send if state == pending else skipped).append(params)
        with self._write() as conn:
            new_to_send = insert_listed(conn, self.dialect, to_send)
            new_skipped = insert_listed(conn, self.dialect, skipped)
            added = Listed(new_to_send + new_skipped)
            added.to_send = new_to_send
            if new_to_send < len(to_send):
                # A row the source had lost (`vanished`) and lists again is there once
                # more (deleted, then stored again): it is to be sent, not left behind.
                revived = self._revive_vanished(conn, job_id, [p[5] for p in to_send], now)
                added.to_send += revived
            changes: dict[str, Any] = {"listing_cursor": cursor, "updated_at": now}
            if done:
                changes["listing_done"] = True
            if changes_seq is not None:
                changes["changes_seq"] = changes_seq
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**changes))
        return added

    @staticmethod
    def _revive_vanished(conn: Any, job_id: int, keys: Sequence[str], now: float) -> int:
        """Vanished rows among `keys` back to pending with a fresh attempt budget."""
        check_transition(State.VANISHED, State.PENDING)
        revived = 0
        for start in range(0, len(keys), 500):
            revived += conn.execute(
                update(instances)
                .where(
                    instances.c.job_id == job_id,
                    instances.c.state == State.VANISHED.value,
                    instances.c.source_key.in_(keys[start : start + 500]),
                )
                .values(last_error=None, **pending_again(now))
            ).rowcount
        return revived

    def reset_listing(self, job_id: int) -> None:
        """Forget the listing cursor so that the next run lists the source again."""
        with self._write() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(listing_cursor=None, listing_done=False, updated_at=time.time())
            )

    # -- leases ---------------------------------------------------------------------------

    def lease(
        self,
        job_id: int,
        owner: str,
        limit: int,
        lease_seconds: float,
        *,
        one_per_instance: bool = False,
    ) -> Leased:
        """Atomically take up to `limit` due pending rows for `owner`.

        PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets workers lease side by side (with
        `one_per_instance` they take turns, on an advisory lock). SQLite: the whole
        transaction runs under the database write lock (BEGIN IMMEDIATE).
        `one_per_instance` (folders, where several files may hold one instance) never
        leases a row whose Orthanc ID another row is sending or has sent: such a row is
        skipped as superseded if the other copy is sent, and put back
        ``TWIN_WAIT_SECONDS`` if it is in flight, so that blocked rows never pile up at
        the head of the queue (each lease would read them all again).
        """
        check_transition(State.PENDING, State.IN_FLIGHT)
        check_transition(State.PENDING, State.SKIPPED)
        now = time.time()
        columns = [instances.c.id, instances.c.orthanc_id]
        if one_per_instance:
            columns += [instances.c.has_pixels, instances.c.size, TWIN_STATE]
        take = (
            update(instances)
            .where(instances.c.id.in_(bindparam("ids", expanding=True)))
            .where(instances.c.state == State.PENDING.value)
            .values(
                state=State.IN_FLIGHT.value,
                lease_owner=owner,
                lease_expires=now + lease_seconds,
                attempts=instances.c.attempts + 1,
                updated_at=now,
            )
            .returning(
                instances.c.id,
                instances.c.source_key,
                instances.c.orthanc_id,
                instances.c.path,
                instances.c.size,
                instances.c.md5,
                instances.c.attempts,
            )
        )
        supersede = _supersede(bindparam("ids", expanding=True), now)
        postpone = (
            update(instances)
            .where(
                instances.c.id.in_(bindparam("ids", expanding=True)),
                instances.c.state == State.PENDING.value,
            )
            .values(next_attempt_at=now + TWIN_WAIT_SECONDS, updated_at=now)
        )
        result = Leased()
        with self._write() as conn:
            if one_per_instance and self.dialect == "postgresql":
                # Two workers leasing at once would each miss the copy the other is
                # taking (not committed yet) and send both. Held to the commit; SQLite's
                # BEGIN IMMEDIATE already serialises leases.
                conn.execute(COPIES_LEASE_LOCK, {"job_id": job_id})
            for _ in range(_BLOCKED_ROUNDS):
                # In the job's order (migrator.ledger.order): whole studies, by date.
                candidates = self._due_rows(conn, job_id, columns, limit, now)
                ids: list[int] = []
                superseded: list[int] = []
                postponed: list[int] = []
                # The best free copy of each instance in this batch: the one with pixel
                # data, then the largest; further copies stay pending, to be tried if
                # this one is refused.
                best: dict[str, tuple[bool, int, int]] = {}
                for row_id, orthanc_id, *more in candidates:
                    if not one_per_instance or orthanc_id is None:
                        ids.append(row_id)
                        continue
                    has_pixels, size, twin = more
                    if twin == TWIN_SENT:
                        superseded.append(row_id)
                    elif twin is not None:
                        postponed.append(row_id)
                    else:
                        rank = (bool(has_pixels), size or 0, -row_id)
                        if orthanc_id not in best or rank > best[orthanc_id]:
                            best[orthanc_id] = rank
                ids += [-rank[2] for rank in best.values()]
                if superseded:
                    result.superseded += conn.execute(supersede, {"ids": superseded}).rowcount
                if postponed:
                    conn.execute(postpone, {"ids": postponed})
                if ids or len(candidates) < limit:
                    break
            rows = conn.execute(take, {"ids": ids}).all() if ids else []
        # Handed over in the lease order (RETURNING follows none).
        place = {row[0]: i for i, row in enumerate(candidates)} if rows else {}
        result.extend(sorted((Lease(*row) for row in rows), key=lambda lease: place[lease.id]))
        return result

    def next_due(self, job_id: int) -> float | None:
        """When the earliest pending row becomes due (epoch seconds), or None if none."""
        with self._read() as conn:
            return conn.execute(
                select(func.min(instances.c.next_attempt_at)).where(
                    instances.c.job_id == job_id, instances.c.state == State.PENDING.value
                )
            ).scalar()

    def reclaim_expired(self, job_id: int) -> int:
        """Give back rows whose lease expired (their worker died or hung)."""
        check_transition(State.IN_FLIGHT, State.PENDING)
        now = time.time()
        with self._write() as conn:
            result = conn.execute(
                update(instances)
                .where(
                    instances.c.job_id == job_id,
                    instances.c.state == State.IN_FLIGHT.value,
                    instances.c.lease_expires < now,
                )
                .values(state="pending", lease_owner=None, lease_expires=None, updated_at=now)
            )
        return result.rowcount

    def release(
        self, owner: str, ids: Iterable[int] | None = None, *, job_id: int | None = None
    ) -> int:
        """Hand leased rows back untouched (shutdown, fatal error): pending again, and the
        attempt they were charged is refunded since the instance was not at fault."""
        check_transition(State.IN_FLIGHT, State.PENDING)
        conditions = [
            instances.c.lease_owner == owner,
            instances.c.state == State.IN_FLIGHT.value,
        ]
        if job_id is not None:
            # With the job, the search uses an index instead of reading the whole table.
            conditions.append(instances.c.job_id == job_id)
        if ids is not None:
            id_list = list(ids)
            if not id_list:
                return 0
            conditions.append(instances.c.id.in_(id_list))
        with self._write() as conn:
            result = conn.execute(
                update(instances)
                .where(and_(*conditions))
                .values(
                    state="pending",
                    lease_owner=None,
                    lease_expires=None,
                    attempts=func.max(instances.c.attempts - 1, 0)
                    if self.dialect == "sqlite"
                    else func.greatest(instances.c.attempts - 1, 0),
                    updated_at=time.time(),
                )
            )
        return result.rowcount

    def renew(
        self,
        owner: str,
        lease_seconds: float,
        *,
        job_id: int | None = None,
        activity: Activity | None = None,
    ) -> None:
        """Extend every lease `owner` holds, and beat its run's heartbeat."""
        now = time.time()
        scope = [] if job_id is None else [instances.c.job_id == job_id]
        with self._write() as conn:
            conn.execute(
                update(instances)
                .where(
                    *scope,
                    instances.c.lease_owner == owner,
                    instances.c.state == State.IN_FLIGHT.value,
                )
                .values(lease_expires=now + lease_seconds)
            )
            conn.execute(
                update(runs)
                .where(runs.c.owner == owner)
                .values(heartbeat_at=now, **_activity_values(activity))
            )

    # -- outcomes -------------------------------------------------------------------------

    def record(
        self, owner: str, outcomes: Sequence[Outcome], *, activity: Activity | None = None
    ) -> None:
        """Record a batch of outcomes in one transaction (and the run's `activity`).

        `sent` is accepted from any worker whose row is still pending or in flight (the
        target confirmed it; that is the truth whoever holds the lease); every other
        outcome only from the lease owner, so a slow worker cannot undo another's work.
        """
        if not outcomes:
            return
        now = time.time()
        groups: dict[tuple[State, bool], list[Outcome]] = {}
        for outcome in outcomes:
            check_transition(State.IN_FLIGHT, outcome.state)
            groups.setdefault((outcome.state, outcome.refund), []).append(outcome)
        sent = groups.get((State.SENT, False), [])
        with self._write() as conn:
            for (state, refund), items in groups.items():
                where = [instances.c.id == bindparam("b_id")]
                if state is State.SENT:
                    where.append(
                        or_(instances.c.state == "in_flight", instances.c.state == "pending")
                    )
                else:
                    where.append(instances.c.state == State.IN_FLIGHT.value)
                    where.append(instances.c.lease_owner == owner)
                values: dict[str, Any] = {
                    "state": state.value,
                    "lease_owner": None,
                    "lease_expires": None,
                    "updated_at": now,
                    "http_status": bindparam("b_http"),
                    "last_error": bindparam("b_error"),
                }
                if state is State.SENT:
                    values.update(
                        target_status=bindparam("b_status"),
                        md5=func.coalesce(bindparam("b_md5"), instances.c.md5),
                        size=func.coalesce(bindparam("b_size"), instances.c.size),
                        target_id=bindparam("b_target_id"),
                        sent_at=now,
                    )
                elif state is State.PENDING:
                    values["next_attempt_at"] = bindparam("b_next")
                    if refund:
                        values["attempts"] = instances.c.attempts - 1
                elif state is State.REJECTED:
                    values["target_status"] = bindparam("b_status")
                params = [
                    {
                        "b_id": o.id,
                        "b_http": o.http_status,
                        "b_error": o.error,
                        "b_status": o.target_status,
                        "b_md5": o.md5,
                        "b_size": o.size,
                        "b_next": o.next_attempt_at,
                        "b_target_id": o.target_id,
                    }
                    for o in items
                ]
                conn.execute(update(instances).where(*where).values(**values), params)
            conn.execute(
                update(runs)
                .where(runs.c.owner == owner)
                .values(
                    sent=runs.c.sent + len(sent),
                    bytes=runs.c.bytes + sum(o.size or 0 for o in sent),
                    heartbeat_at=now,
                    **_activity_values(activity),
                )
            )

    def retry(
        self, job_id: int, states: Sequence[State], error_contains: str | None = None
    ) -> Requeued:
        """Put rows in `states` (optionally whose last error contains a text) back to
        pending with a fresh attempt budget. Skipped rows whose file must never be sent
        (`states.NEVER_SEND_REASONS`: header-only copies, JSON summaries, DICOMDIR) stay
        skipped. Returns the number of rows moved, with the ones left and why."""
        for state in states:
            check_transition(state, State.PENDING)
        conditions = [
            instances.c.job_id == job_id,
            instances.c.state.in_([s.value for s in states]),
        ]
        if error_contains:
            conditions.append(instances.c.last_error.contains(error_contains, autoescape=True))
        kept: dict[str, int] = {}
        if State.SKIPPED in states:
            never = [
                and_(
                    instances.c.state == State.SKIPPED.value,
                    instances.c.last_error.startswith(reason, autoescape=True),
                )
                for reason in NEVER_SEND_REASONS
            ]
            with self._read() as conn:
                for reason, clause in zip(NEVER_SEND_REASONS, never, strict=True):
                    count = conn.execute(
                        select(func.count()).where(*conditions, clause)
                    ).scalar_one()
                    if count:
                        kept[reason] = count
            conditions.append(~or_(*never))
        result = Requeued(self._requeue(conditions))
        result.kept = kept
        return result

    def _requeue(self, conditions: Sequence[Any], **also: Any) -> int:
        """Rows matching `conditions` back to pending, due now, with a fresh attempt
        budget (and the `also` columns set); returns how many."""
        with self._write() as conn:
            result = conn.execute(
                update(instances).where(*conditions).values(**pending_again(time.time()), **also)
            )
        return result.rowcount

    # -- verification (`migrator verify`) -------------------------------------------------


def _end(display: str) -> str:
    """A job's end without the user name of its URL: credentials (which may be given in
    the URL, the config or the environment) are not part of what a job moves; ledgers
    that stored a user name in the URL compare equal to the same URL without it."""
    return _USERINFO_RE.sub(r"\1", display, count=1)


_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/]*@")


def _job(row: Any) -> Job:
    return Job(
        id=row["id"],
        name=row["name"],
        kind=row["kind"],
        source=row["source"],
        target=row["target"],
        options=json.loads(row["options"] or "{}"),
        created_at=row["created_at"],
        listing_cursor=row["listing_cursor"],
        listing_done=bool(row["listing_done"]),
        changes_seq=row["changes_seq"],
    )


def _activity_values(activity: Activity | None) -> dict[str, Any]:
    if activity is None:
        return {}
    return {"transferring": activity.transferring, "concurrency": activity.concurrency}
