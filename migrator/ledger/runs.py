"""The ledger's bookkeeping of processes: runs with heartbeats, dead-worker recovery, and
the lease on a shared job's listing. Mixed into `Ledger`; it writes through the same
transactions, so the ledger stays the only writer of state.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from sqlalchemy import func, insert, or_, select, update

from migrator.ledger.schema import instances, jobs, runs
from migrator.states import State, check_transition


def process_start_ticks(pid: int) -> int | None:
    """Start time of a process (clock ticks after boot) on Linux, None elsewhere or if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
        return int(raw.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` of this host still runs and is the one that started at
    `start` (clock ticks after boot; None: not recorded, the pid alone decides)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or process_start_ticks(pid) in (None, start)


class RunsMixin:
    """Runs and listing leases (see `migrator.ledger.store.Ledger`)."""

    _write: Any
    _read: Any
    release: Any

    def start_run(self, job_id: int, owner: str, command: str) -> None:
        """Register this process as working on the job, after taking back the leases of
        processes on this host that died without releasing them (kill -9, power cut)."""
        self.reclaim_dead_local(job_id)
        now = time.time()
        pid = os.getpid()
        with self._write() as conn:
            conn.execute(
                insert(runs).values(
                    job_id=job_id,
                    owner=owner,
                    host=socket.gethostname(),
                    pid=pid,
                    pid_start=process_start_ticks(pid),
                    command=command,
                    started_at=now,
                    heartbeat_at=now,
                    status="running",
                )
            )

    def reclaim_dead_local(self, job_id: int) -> int:
        """Give back at once the rows leased by dead processes of this host; leases of
        other hosts' processes come back when they expire. Returns rows given back."""
        check_transition(State.IN_FLIGHT, State.PENDING)
        now = time.time()
        with self._write() as conn:
            stale = conn.execute(
                select(runs.c.owner, runs.c.pid, runs.c.pid_start).where(
                    runs.c.job_id == job_id,
                    runs.c.status == "running",
                    runs.c.host == socket.gethostname(),
                )
            ).all()
            dead = [o for o, p, start in stale if not process_alive(p, start)]
            if not dead:
                return 0
            result = conn.execute(
                update(instances)
                .where(
                    instances.c.job_id == job_id,
                    instances.c.lease_owner.in_(dead),
                    instances.c.state == State.IN_FLIGHT.value,
                )
                .values(state="pending", lease_owner=None, lease_expires=None, updated_at=now)
            )
            conn.execute(
                update(runs).where(runs.c.owner.in_(dead)).values(status="crashed", finished_at=now)
            )
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.listing_owner.in_(dead))
                .values(listing_owner=None, listing_expires=None)
            )
        return result.rowcount

    def claim_listing(self, job_id: int, owner: str, seconds: float) -> bool:
        """Take (or extend) the right to list a shared job's source. False while another
        live worker holds it; the lease expires if that worker dies."""
        now = time.time()
        with self._write() as conn:
            result = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    or_(
                        jobs.c.listing_owner.is_(None),
                        jobs.c.listing_owner == owner,
                        jobs.c.listing_expires < now,
                    ),
                )
                .values(listing_owner=owner, listing_expires=now + seconds)
            )
        return result.rowcount == 1

    def release_listing(self, job_id: int, owner: str) -> None:
        """Give up the listing lease (listing finished, or this worker stops)."""
        with self._write() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.listing_owner == owner)
                .values(listing_owner=None, listing_expires=None)
            )

    def listing_state(self, job_id: int) -> tuple[bool, str | None]:
        """(listing done?, cursor) as the ledger has them now."""
        with self._read() as conn:
            row = conn.execute(
                select(jobs.c.listing_done, jobs.c.listing_cursor).where(jobs.c.id == job_id)
            ).one()
        return bool(row[0]), row[1]

    def reopen_listing(self, job_id: int) -> None:
        """Mark the listing unfinished but keep its cursor: a source that keeps receiving
        instances (mirror) is listed on from where it stopped."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(listing_done=False))

    def active_rows(self, job_id: int) -> tuple[int, int]:
        """(pending, in_flight) counts of a job."""
        with self._read() as conn:
            rows = dict(
                conn.execute(
                    select(instances.c.state, func.count())
                    .where(
                        instances.c.job_id == job_id,
                        instances.c.state.in_([State.PENDING.value, State.IN_FLIGHT.value]),
                    )
                    .group_by(instances.c.state)
                ).all()
            )
        return rows.get(State.PENDING.value, 0), rows.get(State.IN_FLIGHT.value, 0)

    def finish_run(self, owner: str, status: str, *, job_id: int | None = None) -> None:
        """Mark this process's run as ended, releasing anything it still holds."""
        self.release(owner, job_id=job_id)
        with self._write() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.listing_owner == owner)
                .values(listing_owner=None, listing_expires=None)
            )
            conn.execute(
                update(runs)
                .where(runs.c.owner == owner)
                .values(status=status, finished_at=time.time())
            )
