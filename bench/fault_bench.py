"""Benchmark: replication under injected faults, next to the same replication without.

A source Orthanc is filled with N synthetic instances (``testkit.fastgen``). Each scenario
replicates it into a fresh target Orthanc with ``migrator replicate`` (a subprocess, the
console script), both Orthancs behind a ``testkit.Proxy``:

- *clean*: the proxies only forward;
- *faults*: on POST /instances at the target, each of seven faults with probability
  ``--p`` (default 5%): connection reset before the body, reset in the middle of the body,
  503, 409, 500, answer dropped after the target stored the instance, stall longer than
  the client's timeout; on GET /instances at the source (listing and downloads) the same
  kinds with ``--source-p`` (default 1%).

Every run uses ``timeout = 2`` (so a 3 s stall is a timeout) and ``retry.max_attempts =
15``. The faulty replication runs twice: with the default backoff (1 s doubling up to
120 s, full jitter: what a user gets) and with a quick one (0.05 s up to 0.5 s), which
separates the cost of the faults from the time spent waiting out backoffs; ``t99`` /
``t100`` say when 99% / all instances were sent. Afterwards the target must hold
exactly the source's instances, byte-identical (MD5 of every file), and the ledger one
``sent`` row per instance. Printed: instances, faults injected per kind, retries (the
summary line), endpoint outages (circuit breaker), adaptive-concurrency cuts, POSTs seen
by the target, time and rate; written as JSON to ``bench/results/faults-<stamp>.json``.

    .venv/bin/python bench/fault_bench.py [--instances 3000] [--p 0.05] [--source-p 0.01]
        [--concurrency 8] [--seed 1] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (
    machine_facts,
    migrator_cmd,
    print_facts,
    print_table,
    work_folder,
    write_results,
)

from migrator.testkit import OrthancProcess, Proxy, upload_all
from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.mixed import KINDS, MixedFaults

CONFIG = """timeout = 2.0
[retry]
max_attempts = 15
"""
QUICK = "backoff_initial = 0.05\nbackoff_max = 0.5\n"


def run_scenario(
    name: str,
    source: OrthancProcess,
    workdir: Path,
    expected: dict[str, str],
    args: argparse.Namespace,
    faulty: bool,
    quick: bool = False,
) -> dict[str, Any]:
    """Replicate `source` into a fresh target; return what was measured."""
    target = OrthancProcess(workdir / f"target-{name}", name=f"target-{name}").start()
    ledger = workdir / f"{name}.db"
    config = workdir / f"{name}.toml"
    config.write_text(CONFIG + (QUICK if quick else ""))
    to_target = MixedFaults(args.seed, args.p, stall=3.0)
    from_source = MixedFaults(args.seed + 1, args.source_p, only=("GET", "/instances"))
    try:
        with (
            Proxy("127.0.0.1", source.http_port) as src,
            Proxy("127.0.0.1", target.http_port) as tgt,
        ):
            if faulty:
                tgt.set_faults(to_target)
                src.set_faults(from_source)
            cmd = [
                *migrator_cmd(), "replicate", src.url, tgt.url, "--ledger", f"sqlite:///{ledger}",
                "-c", str(args.concurrency), "--config", str(config), "--progress", "none", "-v",
            ]  # fmt: skip
            started = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.monotonic() - started
            posts = tgt.count("POST", "/instances")
            gets = src.count("GET", "/instances/")
        complete = check_complete(target, ledger, expected)
        t50, t99, t100 = sent_times(ledger)
    finally:
        target.stop(graceful=False)
    out = proc.stdout + proc.stderr
    summary = re.search(r"this run: sent (\d+) .* in ([\d.]+) s, .* retries (\d+)", out)
    if proc.returncode != 0 or summary is None:
        print(out[-3000:], file=sys.stderr)
    injected = {**to_target.injected} if faulty else {}
    source_injected = {**from_source.injected} if faulty else {}
    sent, elapsed, retries = (0, wall, 0)
    if summary is not None:
        sent, elapsed, retries = int(summary[1]), float(summary[2]), int(summary[3])
    return {
        "scenario": name,
        "exit_code": proc.returncode,
        "instances": len(expected),
        "sent": sent,
        "faults_target": injected,
        "faults_source": source_injected,
        "faults_total": sum(injected.values()) + sum(source_injected.values()),
        "retries": retries,
        "outages": out.count("is not answering: pausing"),
        "concurrency_cuts": out.count("concurrent transfers instead of"),
        "posts_at_target": posts,
        "file_gets_at_source": gets,
        "elapsed_s": round(elapsed, 2),
        "t50_s": t50,
        "t99_s": t99,
        "t100_s": t100,
        "wall_s": round(wall, 2),
        "rate_per_s": round(sent / elapsed, 1) if elapsed else 0.0,
        "complete": complete,
    }


def sent_times(ledger: Path) -> tuple[float, float, float]:
    """Seconds from the run's start until 50%, 99% and 100% of the rows were sent."""
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        (start,) = conn.execute("SELECT MIN(started_at) FROM runs").fetchone()
        times = [t for (t,) in conn.execute("SELECT sent_at FROM instances ORDER BY sent_at")]
    finally:
        conn.close()
    if not times or None in times:
        return (0.0, 0.0, 0.0)
    pick = [times[min(len(times) - 1, int(q * len(times)))] for q in (0.5, 0.99, 1.0)]
    return tuple(round(t - start, 1) for t in pick)  # type: ignore[return-value]


def check_complete(target: OrthancProcess, ledger: Path, expected: dict[str, str]) -> str:
    """'yes' when the target holds exactly the expected instances, byte-identical, and the
    ledger has one `sent` row for each; else what is wrong."""
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"))
    finally:
        conn.close()
    if states != {"sent": len(expected)}:
        return f"ledger {states}"
    if set(target.instance_ids()) != set(expected):
        return "target set differs"
    with ThreadPoolExecutor(8) as pool:
        stored = dict(zip(expected, pool.map(target.md5, expected), strict=True))
    bad = sum(stored[i] != expected[i] for i in expected)
    return "yes" if not bad else f"{bad} MD5 differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--p", type=float, default=0.05, help="per fault kind, at the target")
    parser.add_argument("--source-p", type=float, default=0.01, help="per kind, at the source")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--default-backoff-only", action="store_true", help="skip the quick-backoff run"
    )
    args = parser.parse_args()

    facts = machine_facts()
    print_facts(facts)
    with work_folder("fault-bench-", keep=args.keep) as workdir:
        source = OrthancProcess(workdir / "source", name="source").start()
        try:
            data = fast_dataset(args.instances, seed=args.seed)
            upload_all(source, data)
            expected = {d.orthanc_id: hashlib.md5(d.data).hexdigest() for d in data}
            results = [run_scenario("clean", source, workdir, expected, args, faulty=False)]
            if not args.default_backoff_only:
                results.append(
                    run_scenario("faults-quick", source, workdir, expected, args, True, quick=True)
                )
            results.append(run_scenario("faults", source, workdir, expected, args, faulty=True))
        finally:
            source.stop(graceful=False)

    print(f"\n{args.instances} instances, -c {args.concurrency}, faults p={args.p} per kind at "
          f"the target, {args.source_p} at the source")  # fmt: skip
    print_table(
        ["scenario", "exit", "sent", "faults", "retries", "outages", "cuts", "POSTs", "t50 s",
         "t99 s", "time s", "inst/s", "complete"],
        [[r["scenario"], r["exit_code"], r["sent"], r["faults_total"], r["retries"], r["outages"],
          r["concurrency_cuts"], r["posts_at_target"], r["t50_s"], r["t99_s"], r["elapsed_s"],
          r["rate_per_s"], r["complete"]] for r in results],
    )  # fmt: skip
    print("\nfaults injected, by kind:")
    print_table(
        ["scenario", "side", *KINDS],
        [row for r in results[1:] for row in (
            [r["scenario"], "target POST", *(r["faults_target"].get(k, 0) for k in KINDS)],
            [r["scenario"], "source GET", *(r["faults_source"].get(k, 0) for k in KINDS)])],
    )  # fmt: skip
    write_results("faults", {"facts": facts, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
