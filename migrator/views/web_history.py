"""`/api/history` of `migrator serve`: instances sent per minute, and the rate in each.

A minute's rate is its count over the seconds it covers: 60 for a minute that is over,
the seconds elapsed for the current one, and, for the minute in which sending starts
(after a minute without any), the seconds since its first send. The rate above the chart
(`status`: the sends of the last five minutes over the seconds since the first of them)
is then an average of the same rates, so the chart's peak is never below it in a steady
run, and a run of twelve seconds shows its true pace, not a sixtieth of it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from migrator.ledger.queries import sends_per_bucket
from migrator.ledger.store import Ledger

BUCKET = 60
# A rate over less than this is not shown larger than the count (as for `status`).
MIN_SPAN = 1.0


def _minute_counts(ledger: Ledger, job_id: int, since: float) -> dict[int, tuple[int, float]]:
    """Per minute (epoch // 60) from `since` on, for one job: instances sent and the
    first send in it."""
    return sends_per_bucket(ledger, job_id, since, BUCKET)


def rates(minutes: list[tuple[int, int, float | None]], now: float) -> list[float]:
    """Instances per second in each minute `(minute, count, first send)`, oldest first
    (see the module docstring for the seconds each minute covers)."""
    out: list[float] = []
    previous = 0
    for minute, count, first in minutes:
        start, end = minute * BUCKET, min((minute + 1) * BUCKET, now)
        if previous == 0 and first is not None:
            start = max(start, first)
        out.append(round(count / max(end - start, MIN_SPAN), 3) if count else 0.0)
        previous = count
    return out


class History:
    """Instances sent per minute, per job, computed incrementally.

    Counting a busy hour reads millions of index entries, too slow for a page polled
    every 2 s. Minutes that are over do not change (except for rows sent again, which
    move to a later minute), so they are counted once and kept; each request re-reads only
    the minutes since the last one. A full recount every REFRESH seconds corrects the
    rows sent again.
    """

    REFRESH = 300.0

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger
        self.lock = threading.Lock()
        self.closed: dict[int, dict[int, tuple[int, float | None]]] = {}
        self.start: dict[int, int] = {}
        self.until: dict[int, int] = {}
        self.counted_at: dict[int, float] = {}

    def get(self, minutes: int = 60, now: float | None = None) -> dict[str, Any]:
        """Per job: `points`, `[minute start (epoch s), instances sent]` for the last
        `minutes`; `rates`, instances per second in each of them; `peak`, the largest."""
        now = time.time() if now is None else now
        current = int(now) // BUCKET
        first = current - minutes + 1
        out = []
        with self.lock:
            for job in self.ledger.list_jobs() if self.ledger is not None else []:
                closed = self._update(job.id, first, current)
                span = [(m, *closed.get(m, (0, None))) for m in range(first - 1, current + 1)]
                # The minute before the window only tells whether sending started in the first.
                per_second = rates(span, now)[1:]
                out.append(
                    {
                        "name": job.name,
                        "points": [[m * BUCKET, n] for m, n, _ in span[1:]],
                        "rates": per_second,
                        "peak": max(per_second, default=0.0),
                    }
                )
        return {"bucket_seconds": BUCKET, "now": now, "jobs": out}

    def _update(self, job_id: int, first: int, current: int) -> dict[int, tuple[int, float | None]]:
        assert self.ledger is not None
        first -= 1
        stale = time.monotonic() - self.counted_at.get(job_id, -self.REFRESH) >= self.REFRESH
        if stale or first < self.start.get(job_id, first + 1):
            self.closed[job_id], self.start[job_id] = {}, first
            self.until[job_id], self.counted_at[job_id] = first, time.monotonic()
        closed = self.closed[job_id]
        fresh = _minute_counts(self.ledger, job_id, self.until[job_id] * BUCKET)
        for minute in range(self.until[job_id], current + 1):
            closed[minute] = fresh.get(minute, (0, None))
        # The current minute is still filling: count it again next time.
        self.until[job_id] = current
        return closed


def history(ledger: Ledger, minutes: int = 60, now: float | None = None) -> dict[str, Any]:
    """Instances sent per minute over the last `minutes`, per job (oldest bucket first)."""
    return History(ledger).get(minutes, now)
