"""Benchmark: resuming a job whose ledger holds a million rows (SQLite and PostgreSQL).

The ledger is filled the way a long listing fills it (``Ledger.save_listing``, pages of
10,000 rows), then ~90% of the rows are set ``sent`` with raw SQL, the rest left
``pending``, and the run that was working on it "dies" (kill -9): its ``runs`` row stays
``running`` with a dead pid, and 8 rows stay ``in_flight`` under its lease. The listing
is done. The first 64 pending rows (the 8 in flight among them) are instances the source
Orthanc really holds; every later pending row names an ID the source does not have (GET
answers 404 -> ``vanished``, which costs the same bookkeeping as a transfer).

Each measurement runs the real resume, ``migrator replicate SRC TGT --job NAME -c 8``,
with a timestamping proxy (no delay) in front of each Orthanc, and records, from the
process start: the first ``GET /system`` (Python start-up, imports, ledger opening), the
first ``GET /instances/{id}/file`` (first lease acted on) and the first ``POST
/instances`` at the target (first transfer). One second after the first POST the run
gets SIGTERM; the time to exit (release of the leases, finish_run) and the peak RSS
(``wait4`` rusage of the child) are recorded. The same is done on a control ledger of
1,000 rows, to separate the fixed start-up cost from what the million rows add, and (for
SQLite) once with the ledger file evicted from the page cache. Then the ledger calls a
run makes are timed one by one in-process, ``migrator status`` is timed, and the query
plans of the calls that turned out slow are printed.

Goals: time to first transfer < 2 s, peak RSS < 250 MB.

    .venv/bin/python bench/resume_bench.py [--rows 1000000] [--repeats 3]
        [--backends sqlite,postgresql] [--control-rows 1000] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (
    Child,
    MachineMeter,
    TimedProxy,
    import_profile,
    machine_facts,
    migrator_cmd,
    pg_database,
    print_facts,
    print_table,
    wait_quiet,
    work_folder,
    write_results,
)

from migrator.endpoints import parse_endpoint
from migrator.ledger.queries import job_counts
from migrator.ledger.store import Ledger
from migrator.testkit import OrthancProcess, iter_dataset, upload_all
from migrator.views.reports import status_document

JOB = "resume-bench"
REAL = 64  # pending rows the source really has (the first ones leased)
DEAD_IN_FLIGHT = 8  # of which in flight under the dead run's lease
PAGE = 10_000
GOAL_STARTUP = 2.0
GOAL_RSS_MB = 250.0


def fake_id(i: int) -> str:
    h = hashlib.sha1(f"resume-bench|{i}".encode()).hexdigest()
    return "-".join(h[k : k + 8] for k in range(0, 40, 8))


def dead_pid() -> int:
    """The pid of a process that has just exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class Fixture:
    """A ledger in the resumed-after-kill-9 state, and how to put it back in that state."""

    def __init__(
        self,
        url: str,
        rows: int,
        pending_fraction: float,
        real_ids: list[str],
        src_display: str,
        tgt_display: str,
    ) -> None:
        self.url = url
        self.rows = rows
        self.n_pending = max(int(rows * pending_fraction), REAL)
        self.n_sent = rows - self.n_pending
        self.real_ids = real_ids
        self.src_display = src_display
        self.tgt_display = tgt_display
        self.dead_owner = f"{socket.gethostname()}:{dead_pid()}:deadbeef"
        self.engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        self.dialect = self.engine.dialect.name
        self.job_id = 0
        self.first_pending = 0

    def fill(self) -> dict[str, float]:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        ledger = Ledger.open(self.url, create=True)
        try:
            job = ledger.ensure_job(
                JOB, "replicate", self.src_display, self.tgt_display, {"concurrency": 8}
            )
            self.job_id = job.id
            rng = random.Random(1)
            # Row order = listing order: the sent ones first, then the pending ones, of
            # which the first REAL are instances the source holds.
            keys = [fake_id(i) for i in range(self.n_sent)]
            keys += self.real_ids
            keys += [fake_id(i) for i in range(self.n_sent, self.rows - len(self.real_ids))]
            for start in range(0, self.rows, PAGE):
                page = [
                    {
                        "source_key": k,
                        "orthanc_id": k,
                        "sop_uid": f"1.2.826.0.1.3680043.8.498.77.{start + j}",
                        "size": rng.randint(100_000, 600_000),
                    }
                    for j, k in enumerate(keys[start : start + PAGE])
                ]
                done = start + PAGE >= self.rows
                ledger.save_listing(
                    job.id,
                    page,
                    f'{{"bench": {start}}}',
                    done=done,
                    changes_seq=1 if done else None,
                )
        finally:
            ledger.close()
        timings["save_listing_1M"] = time.perf_counter() - started
        with self.engine.begin() as conn:
            lo, hi = conn.execute(
                sa.text("SELECT MIN(id), MAX(id) FROM instances WHERE job_id = :j"),
                {"j": self.job_id},
            ).one()
        assert hi - lo + 1 == self.rows, (lo, hi)
        self.first_pending = lo + self.n_sent
        started = time.perf_counter()
        now = time.time()
        md5 = "md5(id::text)" if self.dialect == "postgresql" else "printf('%032x', id)"
        with self.engine.begin() as conn:
            # Sent over the last two hours, in id order (the rate window sees a few).
            conn.execute(
                sa.text(
                    f"UPDATE instances SET state = 'sent', attempts = 1, "
                    f"target_status = 'Success', md5 = {md5}, "
                    f"sent_at = :t0 + (id - :lo) * :step, updated_at = :t0 + (id - :lo) * :step "
                    f"WHERE job_id = :j AND id < :fp"
                ),
                {
                    "t0": now - 7200,
                    "lo": lo,
                    "step": 7000 / max(self.n_sent, 1),
                    "j": self.job_id,
                    "fp": self.first_pending,
                },
            )
            conn.execute(
                sa.text(
                    "INSERT INTO runs (job_id, owner, host, pid, pid_start, command, "
                    "started_at, heartbeat_at, status, sent, bytes) VALUES "
                    "(:j, :o, :h, :p, NULL, 'replicate', :t, :t, 'running', :n, 0)"
                ),
                {
                    "j": self.job_id,
                    "o": self.dead_owner,
                    "h": socket.gethostname(),
                    "p": int(self.dead_owner.split(":")[1]),
                    "t": now - 7200,
                    "n": self.n_sent,
                },
            )
        timings["update_sent"] = time.perf_counter() - started
        self.rearm()
        started = time.perf_counter()
        self.settle()
        timings["settle"] = time.perf_counter() - started
        return timings

    def settle(self) -> None:
        """What a ledger looks like some time after its bulk writes: PostgreSQL vacuumed
        and analysed (autovacuum would have), SQLite's WAL checkpointed."""
        if self.dialect == "postgresql":
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(sa.text("VACUUM ANALYZE"))
        else:
            with self.engine.connect() as c:
                c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def rearm(self) -> None:
        """Back to the state right after the kill -9 (undo what a resumed run did)."""
        now = time.time()
        fp = self.first_pending
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE instances SET state = 'pending', attempts = 0, lease_owner = NULL, "
                    "lease_expires = NULL, next_attempt_at = 0, last_error = NULL, "
                    "http_status = NULL, target_status = NULL, sent_at = NULL, md5 = NULL "
                    "WHERE job_id = :j AND id >= :fp AND state <> 'pending'"
                ),
                {"j": self.job_id, "fp": fp},
            )
            conn.execute(
                sa.text(
                    "UPDATE instances SET state = 'in_flight', attempts = 1, lease_owner = :o, "
                    "lease_expires = :exp WHERE job_id = :j AND id >= :fp AND id < :end"
                ),
                {
                    "o": self.dead_owner,
                    "exp": now + 100,
                    "j": self.job_id,
                    "fp": fp,
                    "end": fp + DEAD_IN_FLIGHT,
                },
            )
            conn.execute(sa.text("DELETE FROM runs WHERE owner <> :o"), {"o": self.dead_owner})
            conn.execute(
                sa.text("UPDATE runs SET status = 'running', finished_at = NULL WHERE owner = :o"),
                {"o": self.dead_owner},
            )
            conn.execute(
                sa.text(
                    "UPDATE jobs SET listing_done = :t, listing_owner = NULL, "
                    "listing_expires = NULL WHERE id = :j"
                ),
                {"t": True, "j": self.job_id},
            )

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return dict(
                conn.execute(sa.text("SELECT state, COUNT(*) FROM instances GROUP BY state")).all()
            )

    def evict_cache(self) -> bool:
        """Drop an SQLite ledger's files from the page cache (a cold start after reboot)."""
        if self.dialect != "sqlite":
            return False
        # Only the database file (the WAL was just checkpointed with TRUNCATE). Closing a
        # descriptor of the file drops every POSIX lock this process holds on it, under
        # SQLite's feet ("disk I/O error" later): close our connections first.
        self.engine.dispose()
        fd = os.open(self.url.removeprefix("sqlite:///"), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True

    def size_mb(self) -> float:
        if self.dialect == "postgresql":
            with self.engine.connect() as conn:
                return (
                    conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
                    / 1e6
                )
        path = Path(self.url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6

    def close(self) -> None:
        self.engine.dispose()


def resumed_run(
    fx: Fixture,
    src: TimedProxy,
    tgt: TimedProxy,
    workdir: Path,
    label: str,
    concurrency: int,
    timeout: float = 120,
) -> dict[str, Any]:
    """One resumed `migrator replicate`, stopped with SIGTERM 1 s after its first POST."""
    quiet = wait_quiet()
    src.clear_times()
    tgt.clear_times()
    meter = MachineMeter()
    cmd = [
        *migrator_cmd(),
        "replicate",
        src.url,
        tgt.url,
        "--ledger",
        fx.url,
        "--job",
        JOB,
        "-c",
        str(concurrency),
        "--progress",
        "none",
    ]
    child = Child.start(cmd, workdir / f"{label}.log")
    t0 = child.started
    first_post = None
    deadline = t0 + timeout
    while child.alive() and time.monotonic() < deadline:
        first_post = tgt.first("POST", "/instances")
        if first_post is not None:
            break
        time.sleep(0.005)
    if first_post is not None:
        while child.alive() and time.monotonic() < first_post + 0.5:
            time.sleep(0.01)
    sigterm = time.monotonic()
    child.signal(signal.SIGTERM)
    code = child.finish(timeout=120)
    assert child.ended is not None

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 3)

    out = {
        "label": label,
        "exit_code": code,
        "first_source_system": rel(src.first("GET", "/system")),
        "first_target_system": rel(tgt.first("GET", "/system")),
        "first_get_file": rel(src.first("GET", "/instances/", "/file")),
        "first_post": rel(first_post),
        "sigterm_to_exit": round(child.ended - sigterm, 3),
        "max_rss_mb": round(child.max_rss_mb or 0, 1),
        "cpu_seconds": round(child.cpu_seconds or 0, 2),
        "machine_busy_before": quiet,
        "machine": meter.done(child.cpu_seconds or 0),
        "posts": sum(1 for _, m, p in tgt.times if m == "POST"),
        "file_gets": sum(1 for _, m, p in src.times if m == "GET" and p.endswith("/file")),
    }
    if first_post is None or code != 130:
        out["log_tail"] = child.log_tail()
    return out


def timed_cli(args: list[str], workdir: Path, label: str) -> dict[str, Any]:
    child = Child.start([*migrator_cmd(), *args], workdir / f"{label}.log")
    code = child.finish(timeout=300)
    assert child.ended is not None
    return {
        "label": label,
        "exit_code": code,
        "seconds": round(child.ended - child.started, 3),
        "max_rss_mb": round(child.max_rss_mb or 0, 1),
    }


def ledger_calls(fx: Fixture) -> list[dict[str, Any]]:
    """Each ledger call of a run, timed in-process on the big ledger (median of 3)."""
    ledger = Ledger.open(fx.url)
    owner = f"{socket.gethostname()}:{os.getpid()}:probe"
    results: list[dict[str, Any]] = []

    def timed(name: str, fn: Callable[[], Any], note: str = "") -> Any:
        times, value = [], None
        for _ in range(3):
            started = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - started)
        results.append({"call": name, "ms": round(sorted(times)[1] * 1000, 1), "note": note})
        return value

    try:
        timed("Ledger.open (engine + alembic revision check)", lambda: Ledger.open(fx.url).close())
        timed("get_job", lambda: ledger.get_job(JOB))
        ledger.start_run(fx.job_id, owner, "bench")
        timed("reclaim_dead_local (nothing dead)", lambda: ledger.reclaim_dead_local(fx.job_id))
        timed("job_counts (GROUP BY state)", lambda: job_counts(ledger, fx.job_id))
        timed("reclaim_expired", lambda: ledger.reclaim_expired(fx.job_id))
        timed(
            "lease(32) + release(owner, ids)",
            lambda: ledger.release(owner, [x.id for x in ledger.lease(fx.job_id, owner, 32, 120)]),
        )
        leases = ledger.lease(fx.job_id, owner, 32, 120)
        timed(
            "renew(owner) [heartbeat, every lease_seconds/3]",
            lambda: ledger.renew(owner, 120),
            f"{len(leases)} rows leased",
        )
        if "job_id" in inspect.signature(ledger.renew).parameters:  # scoped variant (patch)
            timed(
                "renew(owner, job_id=...) [scoped]",
                lambda: ledger.renew(owner, 120, job_id=fx.job_id),
                f"{len(leases)} rows leased",
            )
        timed("active_rows", lambda: ledger.active_rows(fx.job_id))
        timed("next_due", lambda: ledger.next_due(fx.job_id))
        timed("listing_state", lambda: ledger.listing_state(fx.job_id))
        timed("release(owner) [finish_run, shutdown]", lambda: ledger.release(owner))
        if "job_id" in inspect.signature(ledger.release).parameters:
            timed(
                "release(owner, job_id=...) [scoped]",
                lambda: ledger.release(owner, job_id=fx.job_id),
            )
        timed("finish_run(owner)", lambda: ledger.finish_run(owner, "finished"))
        timed("status_document (migrator status)", lambda: status_document(ledger, JOB))
    finally:
        ledger.close()
    fx.rearm()
    return results


def plans(fx: Fixture) -> dict[str, list[str]]:
    """Query plans of the per-owner statements (no job_id in their WHERE)."""
    owner = "x"
    out: dict[str, list[str]] = {}
    queries = {
        "renew / release (WHERE lease_owner = ? AND state = 'in_flight')": (
            "UPDATE instances SET lease_expires = 1 WHERE lease_owner = :o AND state = 'in_flight'"
        ),
        "same with job_id (proposed)": (
            "UPDATE instances SET lease_expires = 1 "
            "WHERE job_id = :j AND state = 'in_flight' AND lease_owner = :o"
        ),
    }
    with fx.engine.connect() as conn:
        for name, sql in queries.items():
            prefix = "EXPLAIN QUERY PLAN " if fx.dialect == "sqlite" else "EXPLAIN "
            rows = conn.execute(sa.text(prefix + sql), {"o": owner, "j": fx.job_id}).all()
            out[name] = [str(r[-1]) for r in rows]
            conn.rollback()
    return out


@contextmanager
def ledger_url(backend: str, workdir: Path, tag: str) -> Iterator[str]:
    if backend == "sqlite":
        path = workdir / f"ledger-{tag}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for p in workdir.glob(path.name + "*"):
                p.unlink()
    else:
        with pg_database(f"bench_resume_{tag}") as url:
            yield url


def bench_backend(
    backend: str,
    rows: int,
    args: argparse.Namespace,
    src: TimedProxy,
    tgt: TimedProxy,
    real_ids: list[str],
    workdir: Path,
    big: bool,
) -> dict[str, Any]:
    tag = "big" if big else "control"
    src_display = parse_endpoint(src.url, role="source").display
    tgt_display = parse_endpoint(tgt.url, role="target").display
    out: dict[str, Any] = {"backend": backend, "rows": rows}
    with ledger_url(backend, workdir, tag) as url:
        fx = Fixture(url, rows, args.pending_fraction, real_ids, src_display, tgt_display)
        try:
            print(f"[{backend}, {rows} rows] filling the ledger...", flush=True)
            out["fill"] = {k: round(v, 2) for k, v in fx.fill().items()}
            out["ledger_mb"] = round(fx.size_mb(), 1)
            out["counts_before"] = fx.counts()
            print(f"  fill {out['fill']}, {out['ledger_mb']} MB, {out['counts_before']}")
            runs = []
            for i in range(args.repeats):
                fx.rearm()
                r = resumed_run(fx, src, tgt, workdir, f"{backend}-{tag}-{i}", args.concurrency)
                r["cache"] = "warm"
                runs.append(r)
                print(f"  run {i + 1}: {_run_line(r)}", flush=True)
            if big and backend == "sqlite":
                fx.rearm()
                fx.settle()
                fx.evict_cache()
                r = resumed_run(fx, src, tgt, workdir, f"{backend}-{tag}-cold", args.concurrency)
                r["cache"] = "cold (ledger file evicted from the page cache)"
                runs.append(r)
                print(f"  cold: {_run_line(r)}", flush=True)
            out["runs"] = runs
            out["counts_after_last_run"] = fx.counts()
            if big:
                fx.rearm()
                out["status_cli"] = [
                    timed_cli(["status", "--ledger", url], workdir, f"{backend}-status"),
                    timed_cli(
                        ["status", "--json", "--ledger", url], workdir, f"{backend}-status-json"
                    ),
                ]
                print(f"  status: {out['status_cli']}")
                out["ledger_calls"] = ledger_calls(fx)
                out["plans"] = plans(fx)
        finally:
            fx.close()
    return out


def _run_line(r: dict[str, Any]) -> str:
    return (
        f"first /system {r['first_source_system']} s, first file GET "
        f"{r['first_get_file']} s, first POST {r['first_post']} s, exit {r['exit_code']} "
        f"{r['sigterm_to_exit']} s after SIGTERM, RSS {r['max_rss_mb']} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pending-fraction", type=float, default=0.1)
    parser.add_argument("--control-rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    results: list[dict[str, Any]] = []
    help_times: list[float] = []
    imports: dict[str, float] = {}
    with work_folder("resume-bench-", keep=args.keep) as workdir:
        source = OrthancProcess(workdir / "source", name="source")
        target = OrthancProcess(workdir / "target", name="target")
        src = tgt = None
        try:
            source.start()
            target.start()
            real = list(iter_dataset(REAL, seed=11))
            upload_all(source, real)
            src = TimedProxy("127.0.0.1", source.http_port).start()
            tgt = TimedProxy("127.0.0.1", target.http_port).start()
            wait_quiet()
            for _ in range(3):
                started = time.perf_counter()
                subprocess.run([*migrator_cmd(), "--help"], capture_output=True, check=True)
                help_times.append(time.perf_counter() - started)
            imports = import_profile()
            print(
                f"`migrator --help`: {sorted(help_times)[1]:.2f} s (interpreter + imports); "
                f"import times (ms, cumulative where first imported): {imports}"
            )
            for backend in args.backends.split(","):
                for rows, big in ((args.control_rows, False), (args.rows, True)):
                    results.append(
                        bench_backend(
                            backend,
                            rows,
                            args,
                            src,
                            tgt,
                            [d.orthanc_id for d in real],
                            workdir,
                            big,
                        )
                    )
        finally:
            for proxy in (src, tgt):
                if proxy is not None:
                    proxy.stop()
            source.stop(graceful=False)
            target.stop(graceful=False)

    print()
    head = [
        "backend",
        "rows",
        "cache",
        "/system s",
        "1st file GET s",
        "1st POST s",
        "SIGTERM->exit s",
        "max RSS MB",
        "exit",
        "busy before",
        "goal",
    ]
    table = []
    for res in results:
        for r in res["runs"]:
            ok = (
                r["first_post"] is not None
                and r["first_post"] < GOAL_STARTUP
                and r["max_rss_mb"] < GOAL_RSS_MB
            )
            table.append(
                [
                    res["backend"],
                    res["rows"],
                    r["cache"].split()[0],
                    r["first_source_system"],
                    r["first_get_file"],
                    r["first_post"],
                    r["sigterm_to_exit"],
                    r["max_rss_mb"],
                    r["exit_code"],
                    f"{r['machine_busy_before']:.0%}",
                    "ok" if ok else "MISSED",
                ]
            )
    print_table(head, table)
    for res in results:
        if "ledger_calls" not in res:
            continue
        print(f"\nledger calls on {res['rows']} rows ({res['backend']}), median of 3:")
        print_table(
            ["call", "ms", "note"], [[c["call"], c["ms"], c["note"]] for c in res["ledger_calls"]]
        )
        for s in res["status_cli"]:
            print(
                f"  `migrator {s['label'].split('-', 1)[1]}`: {s['seconds']} s, "
                f"RSS {s['max_rss_mb']} MB"
            )
        for name, plan in res["plans"].items():
            print(f"  plan, {name}: " + " | ".join(plan))
    write_results(
        "resume",
        {
            "host": facts,
            "params": vars(args) | {"real_pending": REAL, "dead_in_flight": DEAD_IN_FLIGHT},
            "goals": {"first_post_seconds": GOAL_STARTUP, "max_rss_mb": GOAL_RSS_MB},
            "migrator_help_seconds": round(sorted(help_times)[1], 3),
            "import_ms": imports,
            "results": results,
            "table": {"head": head, "rows": table},
        },
    )


if __name__ == "__main__":
    main()
