"""Benchmark: one worker against two on a PostgreSQL ledger.

A source Orthanc holds N small synthetic instances. Each measurement replicates them into
a fresh target Orthanc through a fresh PostgreSQL database:

* 1 worker:  ``migrator replicate SRC TGT --job NAME -c 8``
* 2 workers: the same, plus ``migrator worker --job NAME -c 8`` started as soon as the job
  row exists.

in two settings:

* *direct*: migrator talks to both Orthancs directly; the target's ingest (and the
  two shared CPUs) bound the throughput.
* *latency*: a delay proxy in front of the source and one in front of the target add
  20 ms of round trip to every request, so that one worker with 8 transfers in flight is
  bound by latency (at most 8 / (2 x 20 ms) = 200 instances/s) and a second worker should
  help.

Wall time runs from the first process's start to the last one's exit. The steady rate is
taken from the ledger's ``sent_at`` (the middle 80% of the rows), which leaves out
Python's start-up and the late start of the second worker. The order of the
measurements alternates between repeats.

    .venv/bin/python bench/workers_bench.py [--instances 3000] [--rtt 0.02] [--repeats 2]
        [--concurrency 8] [--settings direct,latency] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (
    Child,
    MachineMeter,
    machine_facts,
    migrator_cmd,
    pg_database,
    print_facts,
    print_table,
    proc_cpu_seconds,
    wait_quiet,
    work_folder,
    write_results,
)

from migrator.testkit import OrthancProcess, Proxy, iter_dataset, upload_all

JOB = "workers-bench"


def warm(source: OrthancProcess) -> float:
    """Read every file once, so that no measurement pays for a cold source."""
    started = time.perf_counter()
    ids = source.instance_ids()
    with source.client() as client, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.get(f"instances/{i}/file").raise_for_status(), ids))
    return time.perf_counter() - started


def wait_job(url: str, timeout: float = 60) -> float:
    """Poll until the job row exists; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                if conn.execute("SELECT 1 FROM jobs WHERE name = %s", (JOB,)).fetchone():
                    return time.monotonic()
        except psycopg.Error:
            pass
        time.sleep(0.02)
    raise RuntimeError("the job row never appeared")


class InFlightProbe(threading.Thread):
    """Samples the rows each process holds in flight (a lease should take at most
    max(2 x concurrency, 32) rows at a time)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="in-flight-probe")
        self.url = url
        self.stop_event = threading.Event()
        self.max_held = 0

    def run(self) -> None:
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop_event.wait(0.25):
                row = conn.execute(
                    "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM instances "
                    "WHERE state = 'in_flight' GROUP BY lease_owner) AS held"
                ).fetchone()
                self.max_held = max(self.max_held, int(row[0] or 0))


def ledger_facts(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        states = dict(
            conn.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall()
        )
        sent_at = [
            r[0]
            for r in conn.execute(
                "SELECT sent_at FROM instances WHERE sent_at IS NOT NULL ORDER BY sent_at"
            )
        ]
        runs = conn.execute(
            "SELECT command, status, sent, finished_at - started_at FROM runs ORDER BY id"
        ).fetchall()
        attempts = conn.execute("SELECT SUM(attempts), MAX(attempts) FROM instances").fetchone()
    steady = None
    if len(sent_at) >= 20:
        lo, hi = sent_at[len(sent_at) // 10], sent_at[len(sent_at) * 9 // 10]
        if hi > lo:
            steady = (len(sent_at) * 8 // 10) / (hi - lo)
    return {
        "states": states,
        "steady_rate": round(steady, 1) if steady else None,
        "runs": [
            {"command": c, "status": s, "sent": n, "seconds": round(d or 0, 2)}
            for c, s, n, d in runs
        ],
        "attempts_sum": attempts[0],
        "attempts_max": attempts[1],
    }


def measure(
    setting: str,
    workers: int,
    source: OrthancProcess,
    args: argparse.Namespace,
    workdir: Path,
    label: str,
) -> dict[str, Any]:
    quiet = wait_quiet()
    target = OrthancProcess(workdir / f"target-{label}", name="target")
    target.start()
    proxies: list[Proxy] = []
    try:
        if setting == "latency":
            proxies = [
                Proxy("127.0.0.1", source.http_port, delay=args.rtt / 2).start(),
                Proxy("127.0.0.1", target.http_port, delay=args.rtt / 2).start(),
            ]
            src_url, tgt_url = proxies[0].url, proxies[1].url
        else:
            src_url, tgt_url = source.url, target.url
        with pg_database("bench_workers") as url:
            common = ["--ledger", url, "-c", str(args.concurrency), "--progress", "none"]
            cpu0 = {"source": proc_cpu_seconds(source.pid), "target": proc_cpu_seconds(target.pid)}
            meter = MachineMeter()
            started = time.monotonic()
            children = [
                Child.start(
                    [*migrator_cmd(), "replicate", src_url, tgt_url, "--job", JOB, *common],
                    workdir / f"{label}-replicate.log",
                )
            ]
            second_at = None
            wait_job(url)
            probe = InFlightProbe(url)
            probe.start()
            if workers > 1:
                for k in range(workers - 1):
                    children.append(
                        Child.start(
                            [*migrator_cmd(), "worker", "--job", JOB, *common],
                            workdir / f"{label}-worker{k}.log",
                        )
                    )
                second_at = children[1].started - started
            codes = [c.finish(timeout=args.timeout) for c in children]
            ended = max(c.ended or 0 for c in children)
            probe.stop_event.set()
            probe.join(5)
            cpu = {
                "source orthanc": proc_cpu_seconds(source.pid) - cpu0["source"],
                "target orthanc": proc_cpu_seconds(target.pid) - cpu0["target"],
                "migrator": sum(c.cpu_seconds or 0 for c in children),
            }
            machine = meter.done(sum(cpu.values()))
            facts = ledger_facts(url)
        count = target.count()
    finally:
        for proxy in proxies:
            proxy.stop()
        target.stop(graceful=False)
        shutil.rmtree(target.workdir, ignore_errors=True)
    wall = ended - started
    out = {
        "setting": setting,
        "workers": workers,
        "label": label,
        "wall_seconds": round(wall, 2),
        "rate": round(args.instances / wall, 1),
        "max_in_flight_per_process": probe.max_held,
        "second_worker_started_at": round(second_at, 2) if second_at is not None else None,
        "exit_codes": codes,
        "target_count": count,
        "ok": all(c == 0 for c in codes) and count == args.instances,
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "max_rss_mb": [round(c.max_rss_mb or 0, 1) for c in children],
        "machine": machine,
        "machine_busy_before": quiet,
        **facts,
    }
    if not out["ok"]:
        out["log_tails"] = [c.log_tail() for c in children]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--rtt", type=float, default=0.02, help="added round trip, seconds")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default="direct,latency")
    parser.add_argument("--size", type=int, default=16, help="image rows = columns")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    results: list[dict[str, Any]] = []
    setup: dict[str, Any] = {}
    with (
        work_folder("workers-bench-", keep=args.keep) as workdir,
        OrthancProcess(workdir / "source", name="source") as source,
    ):
        started = time.perf_counter()
        upload_all(source, iter_dataset(args.instances, size=args.size, seed=3), concurrency=8)
        setup["fill_seconds"] = round(time.perf_counter() - started, 1)
        assert source.count() == args.instances
        with httpx.Client() as client:
            sizes = [int(client.get(f"{source.url}statistics").json()["TotalDiskSize"])]
        setup["mean_file_bytes"] = sizes[0] // args.instances
        time.sleep(3)  # let Orthanc's StableAge events pass
        setup["warm_seconds"] = round(warm(source), 1)
        print(
            f"source: {args.instances} instances (~{setup['mean_file_bytes']} bytes each) "
            f"filled in {setup['fill_seconds']} s"
        )
        for rep in range(args.repeats):
            for setting in args.settings.split(","):
                order = (1, 2) if rep % 2 == 0 else (2, 1)
                for workers in order:
                    label = f"{setting}-{workers}w-{rep}"
                    print(f"{label}...", flush=True)
                    r = measure(setting, workers, source, args, workdir, label)
                    results.append(r)
                    print(
                        f"  {r['wall_seconds']} s wall ({r['rate']}/s), steady "
                        f"{r['steady_rate']}/s, exits {r['exit_codes']}, target "
                        f"{r['target_count']}, per run sent "
                        f"{[x['sent'] for x in r['runs']]}, max in flight per process "
                        f"{r['max_in_flight_per_process']}, CPU {r['cpu_seconds']}, machine "
                        f"busy {r['machine']['machine_busy_fraction']:.0%} (other "
                        f"{r['machine']['other_cpu_s']} s)",
                        flush=True,
                    )
                    if not r["ok"]:
                        print("\n".join(r.get("log_tails", [])))

    print()
    head = [
        "setting",
        "workers",
        "wall s (median)",
        "inst/s",
        "steady inst/s",
        "speedup wall",
        "speedup steady",
        "sent per process",
        "max in flight/process",
        "machine busy",
        "runs ok",
    ]
    rows = []
    summary: dict[str, Any] = {}
    for setting in args.settings.split(","):
        base_wall = base_steady = None
        for workers in (1, 2):
            rs = [r for r in results if r["setting"] == setting and r["workers"] == workers]
            if not rs:
                continue
            wall = statistics.median(r["wall_seconds"] for r in rs)
            steady_values = [r["steady_rate"] for r in rs if r["steady_rate"]]
            steady = statistics.median(steady_values) if steady_values else float("nan")
            if workers == 1:
                base_wall, base_steady = wall, steady
            sp_wall = base_wall / wall if base_wall else float("nan")
            sp_steady = steady / base_steady if base_steady else float("nan")
            summary[f"{setting}-{workers}w"] = {
                "wall_median": wall,
                "steady_median": steady,
                "speedup_wall": round(sp_wall, 2),
                "speedup_steady": round(sp_steady, 2),
                "walls": [r["wall_seconds"] for r in rs],
            }
            rows.append(
                [
                    setting,
                    workers,
                    wall,
                    round(args.instances / wall, 1),
                    steady,
                    f"x{sp_wall:.2f}",
                    f"x{sp_steady:.2f}",
                    " / ".join(str([x["sent"] for x in r["runs"]]) for r in rs),
                    " ".join(str(r.get("max_in_flight_per_process", "?")) for r in rs),
                    " ".join(f"{r['machine']['machine_busy_fraction']:.0%}" for r in rs),
                    f"{sum(r['ok'] for r in rs)}/{len(rs)}",
                ]
            )
    print_table(head, rows)
    write_results(
        "workers",
        {
            "host": facts,
            "params": vars(args),
            "setup": setup,
            "results": results,
            "summary": summary,
            "table": {"head": head, "rows": rows},
        },
    )


if __name__ == "__main__":
    main()
