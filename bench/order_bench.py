"""Benchmark: leases in each order (newest, oldest, listing) on a large job, SQLite and
PostgreSQL; the cost of listing with the lease order's index; per-study counts.

Fills a ledger through `Ledger.save_listing` (ROWS rows: studies of 50 instances over
fifteen years, one in forty undated), then per order:

1. the listing time (the insert path every source takes);
2. the lease time, median of LEASES leases of 128 rows each (the scheduler's batch at
   -c 64), plain and with one copy per instance (folders);
3. `prioritize` of one study, and the lease that follows (it must return that study);
4. `study_progress` (what `status --studies` and the page count);
5. the plan of each query of a lease (SQLite: no temporary B-tree, i.e. no sort of the
   pending rows; PostgreSQL: the index scans and the time of the query alone).

On PostgreSQL the table is analyzed after the listing, as autovacuum does shortly after
a listing of that size (before, its planner sorts every pending row for any order).

Goal: a lease stays in the milliseconds on 100,000+ rows whatever the order (a sort of
every pending row would take tens to hundreds).

    .venv/bin/python bench/order_bench.py [--rows 100000] [--leases 30] [--no-pg]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import machine_facts, pg_database, print_facts, print_table, work_folder

from migrator.ledger.store import Ledger

PER_STUDY = 50
LEASE = 128


def _rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for s in range(n // PER_STUDY):
        day = "" if s % 40 == 0 else f"20{rng.randint(10, 25):02d}{rng.randint(1, 12):02d}"
        day += f"{rng.randint(1, 28):02d}" if day else ""
        for k in range(PER_STUDY):
            rows.append(
                {
                    "source_key": f"{s}-{k}",
                    "orthanc_id": f"o{s}-{k}",
                    "study_uid": f"1.2.826.0.1.3680043.8.498.{s}",
                    "series_uid": f"1.2.826.0.1.3680043.8.498.{s}.1",
                    "sop_uid": f"1.2.826.0.1.3680043.8.498.{s}.1.{k}",
                    "size": 500_000,
                    "study_date": day,
                }
            )
    return rows


def _measure(url: str, order: str, rows: list[dict], leases: int) -> list[object]:
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job("bench", "replicate", "a", "b", {"order": order})
        started = time.perf_counter()
        for at in range(0, len(rows), 10_000):
            ledger.save_listing(job.id, rows[at : at + 10_000], str(at))
        listing = time.perf_counter() - started
        if ledger.dialect == "postgresql":
            # What autovacuum does once a listing has added its rows: without statistics
            # PostgreSQL takes a (job, state) index and sorts, whatever the order.
            with ledger.engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE instances")
        plans = _plans(ledger, job.id)
        plain, copies = [], []
        for i in range(leases):
            started = time.perf_counter()
            ledger.lease(job.id, "bench", LEASE, 600, one_per_instance=bool(i % 2))
            (copies if i % 2 else plain).append(time.perf_counter() - started)
        # A study none of those leases took (its rows all pending).
        for study in range(len(rows) // PER_STUDY // 3, len(rows) // PER_STUDY):
            uid = rows[study * PER_STUDY]["study_uid"]
            started = time.perf_counter()
            moved = ledger.prioritize(job.id, study_uids={uid})
            prio = time.perf_counter() - started
            if moved == PER_STUDY:
                break
        first = ledger.lease(job.id, "bench", PER_STUDY, 600)
        assert {lease.source_key.split("-")[0] for lease in first} == {str(study)}, (
            "the prioritized study is not leased first"
        )
        started = time.perf_counter()
        ledger.study_progress(job.id)
        studies = time.perf_counter() - started
    finally:
        ledger.close()
    ms = 1000.0
    return [
        order,
        f"{listing:.2f} s",
        f"{statistics.median(plain) * ms:.1f} ms",
        f"{statistics.median(copies) * ms:.1f} ms",
        f"{prio * ms:.0f} ms",
        f"{studies * ms:.0f} ms",
        plans,
    ]


def _plans(ledger: Ledger, job_id: int) -> str:
    """How each query of one lease reads the table: SQLite's plan, or PostgreSQL's
    plan nodes with the time of the query alone (independent of the load of the host)."""
    seen: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("SELECT") and "ORDER BY" in statement:
            seen.append((statement, parameters))

    sa.event.listen(ledger.engine, "before_cursor_execute", capture)
    try:
        ledger.lease(job_id, "plan", LEASE, 600)
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", capture)
    out = []
    with ledger.engine.connect() as conn:
        for statement, parameters in seen:
            if ledger.dialect == "sqlite":
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
                out.append("; ".join(r[-1] for r in rows))
            else:
                rows = conn.exec_driver_sql("EXPLAIN ANALYZE " + statement, parameters).all()
                nodes = [r[0].strip() for r in rows if "Scan" in r[0] or "Sort" in r[0]]
                took = next(r[0] for r in rows if r[0].startswith("Execution Time"))
                out.append("; ".join(n.split("  (")[0] for n in nodes) + f" ({took})")
        conn.rollback()
    return " | ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--leases", type=int, default=30)
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()
    print_facts(machine_facts())
    rows = _rows(args.rows)
    head = ["order", "listing", "lease", "lease (copies)", "prioritize", "study counts", "plan"]
    with work_folder("order-bench-") as folder:
        table = [
            _measure(f"sqlite:///{folder / f'{o}.db'}", o, rows, args.leases)
            for o in ("newest", "oldest", "listing")
        ]
    print(f"\nSQLite, {args.rows} rows")
    print_table(head, table)
    if args.no_pg:
        return
    table = []
    for order in ("newest", "oldest", "listing"):
        with pg_database("order_bench") as url:
            table.append(_measure(url, order, rows, args.leases))
    print(f"\nPostgreSQL, {args.rows} rows")
    print_table(head, table)


if __name__ == "__main__":
    main()
