"""Benchmark: how far behind the source a ``migrator mirror`` target stays.

For each ``--poll`` value, with a fresh source and target Orthanc and a fresh ledger:

1. the source receives an initial set (200 instances) and ``migrator mirror SRC TGT
   --poll P -c 8`` starts; the bulk copy is timed until the target holds the set;
2. a paced uploader thread stores new instances into the source at 50 per second for
   20 s (files generated beforehand), recording when each POST was confirmed;
3. a watcher thread follows the target's ``/changes`` every 50 ms and records when each
   new instance appeared there;
4. once every instance has appeared (or after a timeout) the mirror gets SIGTERM.

The lag of an instance is the time from its confirmed store on the source to its first
sight on the target (so it includes up to 50 ms of watcher polling). The ledger's own
``sent_at`` gives a second view (its clock, time.time(), against the store times).

    .venv/bin/python bench/mirror_bench.py [--polls 1,0.5] [--rate 50] [--seconds 20]
        [--initial 200] [--ledger sqlite|postgresql] [--keep]
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from benchkit import (
    Child,
    MachineMeter,
    machine_facts,
    migrator_cmd,
    percentile,
    pg_database,
    print_facts,
    print_table,
    proc_cpu_seconds,
    wait_quiet,
    work_folder,
    write_results,
)

from migrator.testkit import OrthancProcess, make_dataset, upload_all

GOAL_LAG = 5.0


class Watcher(threading.Thread):
    """Follows the target's change log; records when each new instance first appears."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="watcher")
        self.url = url
        self.interval = interval
        self.seen: dict[str, tuple[float, float]] = {}  # id -> (monotonic, time.time())
        self.stop_event = threading.Event()
        self.polls = 0
        with httpx.Client(base_url=url, timeout=30) as client:
            self.since = int(client.get("changes", params={"last": ""}).json()["Last"])

    def run(self) -> None:
        with httpx.Client(
            base_url=self.url, timeout=30, limits=httpx.Limits(keepalive_expiry=0.5)
        ) as client:
            while not self.stop_event.is_set():
                try:
                    body = client.get("changes", params={"since": self.since, "limit": 1000}).json()
                except httpx.HTTPError:
                    time.sleep(self.interval)
                    continue
                now, wall = time.monotonic(), time.time()
                self.polls += 1
                for change in body.get("Changes", []):
                    if change.get("ChangeType") == "NewInstance":
                        self.seen.setdefault(change["ID"], (now, wall))
                self.since = int(body.get("Last", self.since))
                if body.get("Done", True):
                    self.stop_event.wait(self.interval)


class Uploader(threading.Thread):
    """Stores files into the source at a steady rate; records each confirmation."""

    def __init__(self, url: str, files: list[tuple[str, bytes]], rate: float) -> None:
        super().__init__(daemon=True, name="uploader")
        self.url = url
        self.files = files
        self.rate = rate
        self.stored: dict[str, tuple[float, float, float]] = {}  # id -> (start, mono, wall)
        self.started_at = 0.0
        self.late = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(
                base_url=self.url, timeout=30, limits=httpx.Limits(keepalive_expiry=0.5)
            ) as client:
                self.started_at = time.monotonic()
                for i, (orthanc_id, data) in enumerate(self.files):
                    due = self.started_at + i / self.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    elif delay < -0.05:
                        self.late += 1
                    begun = time.monotonic()
                    for attempt in range(3):
                        try:
                            resp = client.post(
                                "instances",
                                content=data,
                                headers={"Content-Type": "application/dicom"},
                            )
                            resp.raise_for_status()
                            break
                        except httpx.TransportError:
                            if attempt == 2:
                                raise
                    self.stored[orthanc_id] = (begun, time.monotonic(), time.time())
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def ledger_sent_at(url: str) -> dict[str, float]:
    sql = "SELECT orthanc_id, sent_at FROM instances WHERE sent_at IS NOT NULL"
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)
        try:
            return dict(conn.execute(sql).fetchall())
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(url) as conn:
        return dict(conn.execute(sql).fetchall())


def measure(poll: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet = wait_quiet()
    label = f"poll{poll}"
    n_new = int(args.rate * args.seconds)
    # Generated up front: the uploader must keep its pace.
    new = make_dataset(n_new, seed=50 + int(poll * 10))
    files = [(d.orthanc_id, d.data) for d in new]
    with ExitStack() as stack:
        source = OrthancProcess(workdir / f"source-{label}", name="source").start()
        stack.callback(source.stop, graceful=False)
        target = OrthancProcess(workdir / f"target-{label}", name="target").start()
        stack.callback(target.stop, graceful=False)
        upload_all(source, make_dataset(args.initial, seed=40 + int(poll * 10)))
        if args.ledger == "postgresql":
            ledger = stack.enter_context(pg_database("bench_mirror"))
        else:
            ledger = f"sqlite:///{workdir / f'{label}.db'}"
        cmd = [
            *migrator_cmd(),
            "mirror",
            source.url,
            target.url,
            "--ledger",
            ledger,
            "--poll",
            str(poll),
            "-c",
            str(args.concurrency),
        ]
        cpu0 = (proc_cpu_seconds(source.pid), proc_cpu_seconds(target.pid))
        child = Child.start(cmd, workdir / f"{label}.log")
        stack.callback(child.finish, timeout=60)
        stack.callback(child.signal, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while target.count() < args.initial:
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"bulk copy did not finish:\n{child.log_tail()}")
            time.sleep(0.1)
        bulk = time.monotonic() - child.started
        # Idle: nothing new on the source; what does following the change log cost?
        time.sleep(1.0)
        idle_cpu0, idle_t0 = proc_cpu_seconds(child.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu = (proc_cpu_seconds(child.pid) - idle_cpu0) / (time.monotonic() - idle_t0)
        watcher = Watcher(target.url)
        uploader = Uploader(source.url, files, args.rate)
        meter = MachineMeter()
        watcher.start()
        uploader.start()
        uploader.join()
        if uploader.error is not None:
            raise RuntimeError(f"uploader failed: {uploader.error!r}")
        upload_span = max(s[1] for s in uploader.stored.values()) - uploader.started_at
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline and not all(k in watcher.seen for k, _ in files):
            time.sleep(0.1)
        watcher.stop_event.set()
        watcher.join(10)
        mirror_cpu_before_stop = proc_cpu_seconds(child.pid)
        machine = meter.done(
            mirror_cpu_before_stop
            + proc_cpu_seconds(source.pid)
            - cpu0[0]
            + proc_cpu_seconds(target.pid)
            - cpu0[1]
        )
        child.signal(signal.SIGTERM)
        code = child.finish(timeout=60)
        sent_at = ledger_sent_at(ledger)
        final_count = target.count()
    lags = [watcher.seen[k][0] - uploader.stored[k][1] for k, _ in files if k in watcher.seen]
    ledger_lags = [sent_at[k] - uploader.stored[k][2] for k, _ in files if k in sent_at]
    missing = sum(1 for k, _ in files if k not in watcher.seen)

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"min": None, "p50": None, "p95": None, "max": None, "mean": None}
        return {
            "min": round(min(values), 3),
            "p50": round(percentile(values, 50), 3),
            "p95": round(percentile(values, 95), 3),
            "max": round(max(values), 3),
            "mean": round(sum(values) / len(values), 3),
        }

    # New instances reach the target in bursts, one per look at the source's changes:
    # the spacing of the bursts is the mirror's real polling period.
    appear = sorted(watcher.seen[k][0] for k, _ in files if k in watcher.seen)
    bursts = [t for i, t in enumerate(appear) if i == 0 or t - appear[i - 1] > 0.3 * poll]
    gaps = [b - a for a, b in itertools.pairwise(bursts)]

    return {
        "poll": poll,
        "initial": args.initial,
        "bulk_copy_seconds": round(bulk, 2),
        "idle_cpu_fraction": round(idle_cpu, 3),
        "new_instances": n_new,
        "upload_seconds": round(upload_span, 2),
        "upload_rate": round(n_new / upload_span, 1),
        "uploads_late_over_50ms": uploader.late,
        "appeared": len(lags),
        "missing": missing,
        "lag_seconds": stats(lags),
        "ledger_sent_lag_seconds": stats(ledger_lags),
        "watcher_polls": watcher.polls,
        "bursts": len(bursts),
        "burst_period_seconds": {
            "median": round(percentile(gaps, 50), 3),
            "min": round(min(gaps), 3),
            "max": round(max(gaps), 3),
        }
        if gaps
        else None,
        "per_instance": [
            [
                round(uploader.stored[k][1] - uploader.started_at, 3),
                round(watcher.seen[k][0] - uploader.stored[k][1], 3) if k in watcher.seen else None,
            ]
            for k, _ in files
        ],
        "target_count_final": final_count,
        "exit_code": code,
        "mirror_max_rss_mb": round(child.max_rss_mb or 0, 1),
        "mirror_cpu_seconds": round(child.cpu_seconds or 0, 2),
        "machine": machine,
        "machine_busy_before": quiet,
        "ok": missing == 0 and final_count == args.initial + n_new and code == 130,
        **({} if code == 130 else {"log_tail": child.log_tail()}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", default="1,0.5")
    parser.add_argument("--rate", type=float, default=50.0, help="new instances per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--initial", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ledger", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    results = []
    with work_folder("mirror-bench-", keep=args.keep) as workdir:
        for poll in (float(p) for p in args.polls.split(",")):
            print(
                f"mirror --poll {poll}: {args.initial} initial, then {args.rate:g}/s for "
                f"{args.seconds:g} s...",
                flush=True,
            )
            r = measure(poll, args, workdir)
            results.append(r)
            print(
                f"  bulk copy {r['bulk_copy_seconds']} s; idle mirror CPU "
                f"{r['idle_cpu_fraction']:.0%} of a core; uploads at {r['upload_rate']}/s; "
                f"lag {r['lag_seconds']}; ledger view {r['ledger_sent_lag_seconds']}; "
                f"bursts every {r['burst_period_seconds']} s; "
                f"missing {r['missing']}; exit {r['exit_code']}; machine busy "
                f"{r['machine']['machine_busy_fraction']:.0%}",
                flush=True,
            )
    print()
    head = [
        "poll s",
        "ledger",
        "new",
        "upload /s",
        "appeared",
        "lag p50 s",
        "p95 s",
        "max s",
        "ledger p50/p95/max s",
        "mirror CPU s",
        "idle CPU",
        "RSS MB",
        "machine busy",
        "goal <5 s",
    ]
    rows = []
    for r in results:
        lag, led = r["lag_seconds"], r["ledger_sent_lag_seconds"]
        rows.append(
            [
                r["poll"],
                args.ledger,
                r["new_instances"],
                r["upload_rate"],
                r["appeared"],
                lag["p50"],
                lag["p95"],
                lag["max"],
                f"{led['p50']}/{led['p95']}/{led['max']}",
                r["mirror_cpu_seconds"],
                f"{r['idle_cpu_fraction']:.0%}",
                r["mirror_max_rss_mb"],
                f"{r['machine']['machine_busy_fraction']:.0%}",
                "ok" if r["ok"] and lag["max"] is not None and lag["max"] < GOAL_LAG else "MISSED",
            ]
        )
    print_table(head, rows)
    write_results(
        "mirror",
        {
            "host": facts,
            "params": vars(args),
            "goal_lag_seconds": GOAL_LAG,
            "results": results,
            "table": {"head": head, "rows": rows},
        },
    )


if __name__ == "__main__":
    main()
