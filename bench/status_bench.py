"""Benchmark: `status`, the web page's APIs and `report` on a ledger of one million rows.

Fills a ledger directly (one job, 1,000,000 rows: 70% sent over the last hour, 20%
pending, failed/rejected rows with a few dozen distinct errors, 30% of the sent rows
verified), then times:

1. ``status_document`` in-process (what ``status --json`` and ``/api/status`` compute);
2. ``migrator status --json`` as a subprocess (wall time, Python start-up included);
3. every API of ``migrator serve`` over HTTP, cache bypassed (the first request);
4. ``migrator report --format csv`` of every row to /dev/null: time and peak memory.

Goal: status and the page answer in under 0.5 s on 1M rows.

    .venv/bin/python bench/status_bench.py [--rows 1000000] [--ledger URL] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

from migrator.ledger.store import Ledger
from migrator.views import web
from migrator.views.reports import status_document

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BATCH = 50_000


def fill(url: str, rows: int) -> None:
    """One job of `rows` rows in a realistic mix of states."""
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job("bench", "replicate", "http://src:8042/", "http://tgt:8042/", {})
        started = time.perf_counter()
        for first in range(0, rows, BATCH):
            batch = [
                {
                    "source_key": f"{i:08x}-0000-0000-0000-000000000000",
                    "orthanc_id": f"{i:08x}-0000-0000-0000-000000000000",
                    "sop_uid": f"1.2.826.0.1.3680043.8.498.9.{i}",
                    "size": 400_000 + i % 200_000,
                }
                for i in range(first, min(first + BATCH, rows))
            ]
            ledger.save_listing(job.id, batch, None, done=first + BATCH >= rows)
        now = time.time()
        with ledger._write() as conn:
            sql = conn.exec_driver_sql
            # ids are 1..rows: bands of states, sent times spread over the last hour.
            sql(
                "UPDATE instances SET state='sent', target_status='Success', attempts=1, "
                f"md5='0123456789abcdef0123456789abcdef', sent_at={now} - (id * 7919 % 3600) "
                f"WHERE id <= {int(rows * 0.7)}"
            )
            sql(
                f"UPDATE instances SET verify_result='match', verified_at={now} "
                f"WHERE id <= {int(rows * 0.2)}"
            )
            sql(
                "UPDATE instances SET verify_result='missing', "
                f"verified_at={now}, verify_detail='not on the target' "
                f"WHERE id > {int(rows * 0.2)} AND id <= {int(rows * 0.21)}"
            )
            sql(
                "UPDATE instances SET state='failed', attempts=8, "
                "last_error='target timed out (ReadTimeout) #' || (id % 40) "
                f"WHERE id > {int(rows * 0.7)} AND id <= {int(rows * 0.75)}"
            )
            sql(
                "UPDATE instances SET state='rejected', target_status='FilteredOut', "
                "last_error='FilteredOut: the target''s filter refused the instance' "
                f"WHERE id > {int(rows * 0.75)} AND id <= {int(rows * 0.78)}"
            )
            sql(
                "UPDATE instances SET state='in_flight', lease_owner='bench:1:x', "
                f"lease_expires={now + 120} "
                f"WHERE id > {int(rows * 0.78)} AND id <= {int(rows * 0.78) + 64}"
            )
        print(f"filled {rows} rows in {time.perf_counter() - started:.1f} s")
    finally:
        ledger.close()


def timed(fn, repeats: int = 5) -> tuple[float, float]:
    """(median, max) seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ledger", help="existing empty ledger URL (default: a temp SQLite)")
    parser.add_argument(
        "--keep", type=Path, help="keep the SQLite ledger in this folder (reused if there)"
    )
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="status-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    url = args.ledger or f"sqlite:///{folder / 'ledger.db'}"
    if args.keep and (folder / "ledger.db").exists() and not args.ledger:
        print(f"reusing the ledger in {folder}")  # filled by an earlier run with --keep
    else:
        fill(url, args.rows)
    results: dict[str, object] = {"rows": args.rows, "ledger": url.split("://")[0]}

    ledger = Ledger.open(url)
    try:
        med, worst = timed(lambda: status_document(ledger))
        results["status_document"] = {"median": med, "max": worst}
        print(f"status_document: median {med * 1000:.0f} ms, max {worst * 1000:.0f} ms")
        for name, fn in (
            ("history", lambda: web.history(ledger, 60)),
            ("verify_counts", lambda: web.verify_counts(ledger)),
        ):
            med, worst = timed(fn)
            results[name] = {"median": med, "max": worst}
            print(f"{name}: median {med * 1000:.0f} ms, max {worst * 1000:.0f} ms")

        # As served: a page polling every 2 s (the first load computes, later ones are
        # answered from the cache while it is refreshed in the background).
        server = web.DashboardServer(("127.0.0.1", 0), ledger)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        page: list[float] = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(8):
                started = time.perf_counter()
                for path in ("", "api/status", "api/history?minutes=60", "api/verify"):
                    client.get(path).raise_for_status()
                page.append(time.perf_counter() - started)
                time.sleep(2)
        server.shutdown()
        server.server_close()
        results["page_poll_as_served"] = {"first": page[0], "later_max": max(page[1:])}
        print(f"page poll as served: first {page[0] * 1000:.0f} ms, then at most "
              f"{max(page[1:]) * 1000:.0f} ms")  # fmt: skip

        web._Cache.get = lambda self, key, compute: compute()  # no cache: compute each time
        server = web.DashboardServer(("127.0.0.1", 0), ledger)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with httpx.Client(base_url=base, timeout=30) as client:
            for path in ("", "api/status", "api/history?minutes=60", "api/verify", "metrics"):
                med, worst = timed(lambda p=path: client.get(p).raise_for_status())
                results[f"GET /{path}"] = {"median": med, "max": worst}
                print(f"GET /{path}: median {med * 1000:.0f} ms, max {worst * 1000:.0f} ms")
        server.shutdown()
        server.server_close()
    finally:
        ledger.close()

    cli = [sys.executable, "-m", "migrator"]
    med, worst = timed(
        lambda: subprocess.run(
            [*cli, "status", "--json", "--ledger", url], check=True, capture_output=True
        ),
        repeats=3,
    )
    startup, _ = timed(
        lambda: subprocess.run([*cli, "--help"], check=True, capture_output=True), repeats=3
    )
    results["status_cli"] = {"median": med, "max": worst, "cli_startup": startup}
    print(f"migrator status --json: median {med:.2f} s (of which CLI start-up {startup:.2f} s)")

    started = time.perf_counter()
    with open("/dev/null", "w") as sink:
        subprocess.run(
            [*cli, "report", "--format", "csv", "--ledger", url], check=True, stdout=sink
        )
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results["report_csv"] = {"seconds": elapsed, "peak_rss_mib": peak}
    print(f"migrator report (csv, {args.rows} rows): {elapsed:.1f} s, peak RSS {peak:.0f} MiB")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"status-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
