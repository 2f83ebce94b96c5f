"""Read-only views of the ledger: counts, rates, ETA, top errors, workers.

`job_status` builds the object that `migrator status --json` prints (one per job); the
shape is documented in the README and is the contract of the `status --json` output.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from migrator.ledger import queries
from migrator.ledger.order import ORDER_LISTING
from migrator.ledger.queries import job_counts
from migrator.ledger.runs import process_alive
from migrator.ledger.store import Job, Ledger
from migrator.selection import Selection
from migrator.states import State
from migrator.units import human_bytes

__all__ = ["human_bytes", "human_duration", "job_status", "render_status", "status_document"]

RATE_WINDOW = 300.0
# A worker on another host whose heartbeat is older than this (the default lease; it beats
# every third of it) is shown as gone.
STALE_HEARTBEAT = 120.0
TOP_ERRORS = 5
ACTIVE_STATES = (State.PENDING, State.IN_FLIGHT)


def job_status(
    ledger: Ledger, job: Job, now: float | None = None, *, studies: float | None = None
) -> dict[str, Any]:
    """Everything `status` shows about one job, as plain JSON-ready data; with `studies`,
    its studies counted by how far they got, at most that many seconds old (see
    `study_counts`)."""
    now = time.time() if now is None else now
    # On millions of rows the state counts and the byte sum are the two long scans: run
    # them beside the other queries, each on its own connection (SQLite's WAL lets readers
    # run together, and sqlite3 releases the GIL while it scans).
    with ThreadPoolExecutor(2) as pool:
        counts_done = pool.submit(job_counts, ledger, job.id)
        bytes_done = pool.submit(queries.sent_bytes, ledger, job.id)
        activity = queries.job_activity(ledger, job.id, now - RATE_WINDOW, TOP_ERRORS)
        counts, sent_bytes = counts_done.result(), bytes_done.result()
    recent, recent_bytes, first = activity.recent, activity.recent_bytes, activity.first_recent
    errors, running, held = activity.errors, activity.running, activity.held
    live, gone = _split_workers(running, now)
    # Without a live worker nothing moves: no rate, no ETA (the last run's pace says
    # nothing about when the rest will be sent).
    span = min(RATE_WINDOW, max(now - first, 1.0)) if recent and live else RATE_WINDOW
    rate = recent / span if recent and live else 0.0
    remaining = sum(counts[s.value] for s in ACTIVE_STATES)
    total = sum(counts.values())
    workers = [_worker(row, held.get(row.owner, 0)) for row in live]
    abandoned = sum(held.get(w[0], 0) for w in gone)
    # Rows in flight are either being sent now or wait in a live worker's queue (leased
    # ahead); the counts and the runs are read a moment apart, hence the bounds.
    transferring = min(sum(w["transferring"] for w in workers), counts[State.IN_FLIGHT.value])
    queued = max(counts[State.IN_FLIGHT.value] - abandoned - transferring, 0)
    return {
        "name": job.name,
        "kind": job.kind,
        "source": job.source,
        "target": job.target,
        "created": job.created_at,
        "listing_done": job.listing_done,
        # What the job moves and in which order (`migrator.selection`, `ledger.order`).
        "selection": Selection.from_options(job.options.get("selection")).describe(),
        "order": job.options.get("order") or ORDER_LISTING,
        "studies": None if studies is None else study_counts(ledger, job, studies),
        "total": total,
        "counts": counts,
        "done": total - remaining,
        "remaining": remaining,
        "bytes_sent": int(sent_bytes),
        "rate": round(rate, 2),
        "bytes_rate": round(float(recent_bytes) / span, 1) if rate else 0.0,
        "eta_seconds": round(remaining / rate, 1) if rate > 0 and remaining else None,
        # Of the rows in flight: transfers under way, rows leased ahead by live workers.
        "transferring": transferring,
        "queued": queued,
        # Rows in flight whose worker is gone: the next run takes them back.
        "abandoned": abandoned,
        "top_errors": [
            {"state": state, "reason": reason, "count": n} for state, reason, n in errors
        ],
        # Instances a mirror sent and then found deleted on its source: in all, and of
        # those, deleted on the target too (`engine.deletions`).
        "deleted": ledger.deletion_counts(job.id),
        "workers": workers,
        # Runs that never finished and whose process is gone (killed, crashed, host down).
        "gone_workers": [
            {
                "owner": owner,
                "command": command,
                "started": started,
                "heartbeat": beat,
                "sent": sent,
                "in_flight": held.get(owner, 0),
                "reason": reason,
            }
            for (owner, command, started, beat, sent, *_), reason in gone.items()
        ],
    }


def _worker(row: Any, in_flight: int) -> dict[str, Any]:
    """One live worker of `job_status`: what it holds, sends now and has queued."""
    transferring = min(row.transferring or 0, in_flight)
    return {
        "owner": row.owner,
        "command": row.command,
        "started": row.started_at,
        "heartbeat": row.heartbeat_at,
        "sent": row.sent,
        "bytes": row.bytes,
        "in_flight": in_flight,
        "transferring": transferring,
        "queued": in_flight - transferring,
        # The transfers it allows at once now (None: a run that did not say).
        "concurrency": row.concurrency,
    }


def _split_workers(running: Any, now: float) -> tuple[list[Any], dict[Any, str]]:
    """The live runs among those marked running, and the gone ones with the reason.

    On this host the process itself is asked (pid and start time, as the run recorded
    them); elsewhere a run is gone once its heartbeat is older than a lease.
    """
    host = socket.gethostname()
    live: list[Any] = []
    gone: dict[Any, str] = {}
    for row in running:
        if row.host == host:
            if process_alive(row.pid, row.pid_start):
                live.append(row)
            else:
                gone[row] = f"process {row.pid} ended without finishing its run"
        elif now - row.heartbeat_at <= STALE_HEARTBEAT:
            live.append(row)
        else:
            gone[row] = f"no heartbeat from {row.host} for {human_duration(now - row.heartbeat_at)}"
    return live, gone


def status_document(
    ledger: Ledger, job_name: str | None = None, *, studies: float | None = None
) -> dict[str, Any]:
    """The `status --json` document: ``{"jobs": [job_status, ...]}`` (with `studies`,
    each job's per-study counts at most that many seconds old)."""
    if job_name is not None:
        job = ledger.get_job(job_name)
        jobs = [job] if job else []
    else:
        jobs = ledger.list_jobs()
    return {"jobs": [job_status(ledger, job, studies=studies) for job in jobs]}


# Per-study counts read last, by (ledger, job): (when, counts), and the counts under way.
# Counting reads every row of the job (~0.25 s per 100,000 rows): the page, polling every
# 2 s, shows counts a few seconds old, counted again beside it.
_STUDY_COUNTS: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}
_COUNTING: set[tuple[str, int]] = set()
_COUNTING_LOCK = threading.Lock()


def study_counts(ledger: Ledger, job: Job, max_age: float = 0.0) -> dict[str, Any] | None:
    """The job's studies by how far they got (`StudyProgress.as_json`). With `max_age`
    0, counted now; otherwise the last count while it is younger than that, and when it
    is older, that one (None at first) while a thread counts again."""
    key = (ledger.display_url, job.id)
    cached = _STUDY_COUNTS.get(key)
    if max_age <= 0:
        counts = ledger.study_progress(job.id).as_json()
        _STUDY_COUNTS[key] = (time.monotonic(), counts)
        return counts
    if cached is not None and time.monotonic() - cached[0] <= max_age:
        return cached[1]
    with _COUNTING_LOCK:
        if key in _COUNTING:
            return cached[1] if cached else None
        _COUNTING.add(key)

    def count() -> None:
        try:
            _STUDY_COUNTS[key] = (time.monotonic(), ledger.study_progress(job.id).as_json())
        except Exception:  # the page shows the last counts; status says what is wrong
            pass
        finally:
            with _COUNTING_LOCK:
                _COUNTING.discard(key)

    threading.Thread(target=count, name="study-counts", daemon=True).start()
    return cached[1] if cached else None


def render_studies(studies: dict[str, Any]) -> str:
    """One line of per-study progress for `status`."""
    line = (
        f"  studies: {studies['complete']} complete, {studies['partial']} partial, "
        f"{studies['pending']} pending, {studies['failed']} failed (of {studies['total']})"
    )
    if studies["complete_since"]:
        line += f"; everything since {studies['complete_since']} is on the target"
    elif studies["latest_complete"]:
        line += f"; most recent complete study {studies['latest_complete']}"
    return line


def human_duration(seconds: float | None) -> str:
    """3725 -> '1h02m'."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _in_flight(job: dict[str, Any]) -> str:
    parts = [f"{job['transferring']} transferring", f"{job['queued']} queued"]
    if job["abandoned"]:
        parts.append(f"{job['abandoned']} abandoned")
    return ", ".join(parts)


def render_status(doc: dict[str, Any]) -> str:
    """Human text for `migrator status`."""
    if not doc["jobs"]:
        return "no jobs in this ledger"
    blocks = []
    for job in doc["jobs"]:
        counts = job["counts"]
        lines = [
            f"job {job['name']} ({job['kind']}): {job['source']} -> {job['target']}",
            "  "
            + "  ".join(f"{state} {count}" for state, count in counts.items())
            + f"  (total {job['total']})",
            f"  sent {human_bytes(job['bytes_sent'])}; "
            + (
                f"rate {job['rate']:.1f}/s ({human_bytes(job['bytes_rate'])}/s); "
                f"ETA {human_duration(job['eta_seconds'])}"
                if job["workers"]
                else "no worker running"
            )
            + ("" if job["listing_done"] else "; listing not finished"),
        ]
        if job.get("selection", "everything") != "everything":
            lines.append(f"  selection: {job['selection']}")
        if job.get("studies"):
            lines.append(render_studies(job["studies"]))
        if counts["in_flight"]:
            lines.append(f"  in_flight {counts['in_flight']}: {_in_flight(job)}")
        if job["top_errors"]:
            lines.append("  most common reasons:")
            lines += [
                f"    {e['count']:>7}  {e['state']}: {e['reason']}" for e in job["top_errors"]
            ]
        if job["deleted"]["on_source"]:
            lines.append(
                f"  deleted on the source after they were sent: {job['deleted']['on_source']}"
                f" ({job['deleted']['on_target']} deleted on the target too)"
            )
        for w in job["workers"]:
            allowed = f", concurrency {w['concurrency']}" if w["concurrency"] else ""
            lines.append(
                f"  worker {w['owner']} ({w['command']}): {w['transferring']} transferring, "
                f"{w['queued']} queued{allowed}; sent {w['sent']}"
            )
        for w in job["gone_workers"]:
            lines.append(
                f"  worker {w['owner']} ({w['command']}) is gone: {w['reason']}"
                + (
                    f"; its {w['in_flight']} rows in flight are abandoned, the next run "
                    "takes them back"
                    if w["in_flight"]
                    else ""
                )
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
