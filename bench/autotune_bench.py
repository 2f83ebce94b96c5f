"""Benchmark: self-tuning concurrency (no flag) against fixed ``-c`` 4/8/16/32/64.

One source Orthanc is filled with N small synthetic instances. For each added round trip
(``--rtt``, default 0, 20 and 100 ms; a :class:`migrator.testkit.Proxy` in front of each
Orthanc adds ``rtt / 2`` each way), every configuration replicates the source into a
fresh target Orthanc: ``migrator replicate`` with no concurrency flag, and with
``--fixed -c N``. Rounds are interleaved (every configuration once per round, the order
rotated from round to round) and the table shows medians with the spread (min-max), the
settle point of the self-tuning runs (the "concurrency settles at" line of the log, and the
concurrency the ledger's runs table holds at the end) and the ratio to the best fixed
``-c``. Optionally (``--replicate-py``) Orthanc's sequential Replicate.py (Debian's
orthanc-doc) runs on the first M instances at one RTT, extrapolated linearly to N.

The machine is small and shared: other processes' CPU shows as noise, hence the
interleaving and medians. Results go to ``bench/results/autotune-<timestamp>.json``.

    .venv/bin/python bench/autotune_bench.py [--instances 2000] [--rtt 0 --rtt 0.02 ...]
        [--concurrency 4 --concurrency 8 ...] [--rounds 3] [--replicate-py 0.02]
        [--extra=--batch=1]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import machine_facts, migrator_cmd, work_folder, write_results
from replicate_bench import REPLICATE_PY, REPLICATE_PYTHON, bare_copy

from migrator.testkit import OrthancProcess, Proxy, iter_dataset, upload_all

SETTLES = re.compile(r"concurrency settles at (\d+) transfers")
BATCH = re.compile(r"sending (\d+) small instances per request")
AUTO = "no flag"
NOTES = re.compile(r"concurren|per request|batched")


def run_one(
    workdir: Path, source_url: str, delay: float, label: str, flags: list[str], n: int
) -> dict[str, Any]:
    """One replicate into a fresh target behind its own delay proxy."""
    tag = re.sub(r"\W+", "_", label)
    target = OrthancProcess(workdir / f"t-{tag}-{time.monotonic_ns()}", name="target").start()
    proxy = Proxy("127.0.0.1", target.http_port, delay=delay).start()
    ledger = target.workdir / "bench.db"
    cmd = [
        *migrator_cmd(),
        "replicate",
        source_url,
        proxy.url,
        "--ledger",
        f"sqlite:///{ledger}",
        "--progress",
        "plain",
        *flags,
    ]
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        # Only the migrator process ends (and is reaped) inside this span.
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        count = target.count()
    finally:
        proxy.stop()
        target.stop()
    out = proc.stdout + proc.stderr
    settles = [int(x) for x in SETTLES.findall(out)]
    batch = BATCH.search(out)
    final = None
    if ledger.exists():
        with sqlite3.connect(ledger) as db:
            row = db.execute("SELECT concurrency FROM runs ORDER BY id DESC LIMIT 1").fetchone()
            final = row[0] if row else None
    ok = proc.returncode == 0 and count == n
    if not ok:
        print(f"  {label}: FAILED (exit {proc.returncode}, {count}/{n})\n{out[-1500:]}")
    return {
        "label": label,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "ok": ok,
        "settles": settles,
        "batch": int(batch.group(1)) if batch else 1,
        "final_concurrency": final,
        "progress": [line for line in out.splitlines() if " progress " in line][-3:],
        # What the run decided for itself: batch size, settle point, cuts.
        "lines": [line for line in out.splitlines() if NOTES.search(line)][:12],
    }


def run_replicate_py(
    workdir: Path, source_url: str, delay: float, m: int, timeout: float
) -> dict[str, Any]:
    """Replicate.py, unmodified, timed until the target holds `m` instances."""
    target = OrthancProcess(workdir / f"t-replicate-py-{time.monotonic_ns()}").start()
    proxy = Proxy("127.0.0.1", target.http_port, delay=delay).start()
    cmd = [REPLICATE_PYTHON, "-u", str(REPLICATE_PY), source_url.rstrip("/"), proxy.url.rstrip("/")]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    count = 0
    try:
        while time.perf_counter() - started < timeout:
            count = target.count()
            if count >= m or proc.poll() is not None:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
        proxy.stop()
        target.stop()
    return {"instances": count, "seconds": round(elapsed, 3)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max seconds of one configuration's runs; settle points."""
    secs = [r["seconds"] for r in runs if r["ok"]]
    cpus = [r["cpu_seconds"] for r in runs if r["ok"]]
    return {
        "median": round(statistics.median(secs), 2) if secs else None,
        "cpu_median": round(statistics.median(cpus), 2) if cpus else None,
        "min": min(secs, default=None),
        "max": max(secs, default=None),
        "runs": len(runs),
        "failed": sum(not r["ok"] for r in runs),
        "settles": [r["settles"][:1] for r in runs],
        "batch": sorted({r["batch"] for r in runs}),
        "final_concurrency": [r["final_concurrency"] for r in runs],
    }


def main() -> None:
    """Fill the source, run every RTT's interleaved rounds, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rtt", type=float, action="append", help="seconds (repeatable)")
    parser.add_argument("--concurrency", type=int, action="append", help="fixed -c to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=16, help="image rows = columns")
    parser.add_argument("--replicate-py", type=float, help="also Replicate.py at this RTT")
    parser.add_argument("--replicate-py-instances", type=int, default=200)
    parser.add_argument("--extra", action="append", default=[], help="flag for every run")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    rtts = args.rtt or [0.0, 0.02, 0.1]
    fixed = args.concurrency or [4, 8, 16, 32, 64]
    configs = [(AUTO, list(args.extra))] + [
        (f"-c {c} --fixed", ["-c", str(c), "--fixed", *args.extra]) for c in fixed
    ]
    n = args.instances
    doc: dict[str, Any] = {"machine": machine_facts(), "instances": n, "rounds": args.rounds}
    doc["extra_flags"] = args.extra
    with work_folder("autotune-bench-", keep=args.keep) as workdir:
        source = OrthancProcess(workdir / "source", name="source").start()
        try:
            print(f"filling the source with {n} instances...", flush=True)
            upload_all(source, iter_dataset(n, size=args.size, seed=11), concurrency=8)
            time.sleep(3)  # Orthanc's stable events pass
            asyncio.run(bare_copy(source.url, None, 8))  # every file read once: warm cache
            results: dict[str, Any] = {}
            for rtt in rtts:
                src = Proxy("127.0.0.1", source.http_port, delay=rtt / 2).start()
                try:
                    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in configs}
                    for rnd in range(args.rounds):
                        shift = rnd % len(configs)
                        for label, flags in configs[shift:] + configs[:shift]:
                            r = run_one(workdir, src.url, rtt / 2, label, flags, n)
                            runs[label].append(r)
                            print(
                                f"rtt {rtt * 1000:.0f} ms round {rnd + 1} {label}: "
                                f"{r['seconds']:.2f} s (CPU {r['cpu_seconds']:.2f} s) "
                                f"batch {r['batch']} settles {r['settles'][:1]} "
                                f"final {r['final_concurrency']}",
                                flush=True,
                            )
                    if args.replicate_py is not None and abs(args.replicate_py - rtt) < 1e-9:
                        m = args.replicate_py_instances
                        rp = run_replicate_py(workdir, src.url, rtt / 2, m, 1800)
                        rp["extrapolated"] = round(rp["seconds"] * n / max(rp["instances"], 1), 1)
                        results[f"replicate.py@{rtt}"] = rp
                        print(f"Replicate.py: {rp}", flush=True)
                finally:
                    src.stop()
                results[str(rtt)] = {
                    label: {**summarize(rs), "all": rs} for label, rs in runs.items()
                }
        finally:
            source.stop()
    print()
    for rtt in rtts:
        table = results[str(rtt)]
        best = min(
            (v["median"], k) for k, v in table.items() if k != AUTO and v["median"] is not None
        )
        print(f"RTT {rtt * 1000:.0f} ms ({n} instances, median of {args.rounds}, min-max):")
        for label, v in table.items():
            ratio = v["median"] / best[0] if v["median"] else float("nan")
            extra = ""
            if label == AUTO:
                extra = f"  settles {v['settles']} final {v['final_concurrency']}"
            extra += f"  batch {v['batch']}"
            print(
                f"  {label:>14}: {v['median']:7.2f} s ({v['min']:.2f}-{v['max']:.2f}, "
                f"CPU {v['cpu_median']} s) x{ratio:.2f} of best ({best[1]}){extra}"
            )
        if f"replicate.py@{rtt}" in results:
            rp = results[f"replicate.py@{rtt}"]
            auto = table[AUTO]["median"]
            print(
                f"  Replicate.py: {rp['instances']} in {rp['seconds']} s, extrapolated "
                f"{rp['extrapolated']} s = x{rp['extrapolated'] / auto:.0f} the no-flag run"
            )
    doc["results"] = results
    path = write_results("autotune", doc)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
