"""Benchmark: ``migrator replicate`` (no flag) against a bare 32-connection httpx loop on
long, bandwidth-limited links.

A source Orthanc is filled with N small synthetic instances. Every Orthanc is reached
through a :class:`migrator.testkit.Proxy` that adds ``rtt / 2`` of latency each way and
caps the bandwidth at ``--rate`` bytes per second each way (shared by all connections of
that proxy, as on one network link). For each RTT, rounds alternate, each into a fresh
target Orthanc:

1. *bare*: ``replicate_bench.py --bare-worker``: page ``GET /instances``, then with 32
   connections ``GET /instances/{id}/file`` and ``POST /instances``. No ledger.
2. *migrator*: ``migrator replicate SRC TGT --ledger sqlite:///...`` with no other flag:
   the batch size (and concurrency) are whatever it decides itself.

Medians, spreads and every round are printed and written to
``bench/results/batch-<timestamp>.json``.

    .venv/bin/python bench/batch_bench.py [--instances 2000] [--rtts 0.1,0.02]
        [--rate 12.5e6] [--size 64] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import machine_facts, migrator_cmd, print_table, work_folder, write_results

from migrator.testkit import OrthancProcess, Proxy, iter_dataset, upload_all

BARE = Path(__file__).resolve().with_name("replicate_bench.py")


def _target(workdir: Path, label: str, delay: float, rate: float) -> tuple[OrthancProcess, Proxy]:
    orthanc = OrthancProcess(workdir / label, name=label).start()
    return orthanc, Proxy("127.0.0.1", orthanc.http_port, delay=delay, rate=rate).start()


def run_once(
    kind: str, workdir: Path, label: str, src: Proxy, delay: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One copy of the whole source into a fresh target; wall time of the client."""
    orthanc, proxy = _target(workdir, label, delay, args.rate)
    try:
        src.reset_counts()
        if kind == "bare":
            cmd = [sys.executable, str(BARE), "--bare-worker", src.url, proxy.url,
                   "--concurrency", "32"]  # fmt: skip
        else:
            ledger = workdir / f"{label}.db"
            cmd = [*migrator_cmd(), "replicate", src.url, proxy.url,
                   "--ledger", f"sqlite:///{ledger}", "--progress", "none"]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        count = orthanc.count()
        out = proc.stdout + proc.stderr
        batch = re.search(r"sending (\d+) small instances per request", out)
        return {
            "kind": kind,
            "seconds": round(wall, 3),
            "exit_code": proc.returncode,
            "target_count": count,
            "complete": proc.returncode == 0 and count == args.instances,
            "batch": int(batch.group(1)) if batch else None,
            "source_requests": sum(src.counts.values()),
            "target_requests": sum(proxy.counts.values()),
            "tail": out.strip().splitlines()[-2:] if proc.returncode else [],
        }
    finally:
        proxy.stop()
        orthanc.stop(graceful=False)


def main() -> None:
    """Fill the source once, then alternate bare / migrator rounds at each RTT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rtts", default="0.1,0.02", help="added round trips, seconds")
    parser.add_argument("--rate", type=float, default=12.5e6, help="bytes/s each way")
    parser.add_argument("--size", type=int, default=64, help="image rows = columns")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtts.split(",")]
    doc: dict[str, Any] = {"machine": machine_facts(), "args": vars(args), "rtts": {}}
    rows: list[list[Any]] = []
    with work_folder("batch-bench-", keep=args.keep) as workdir:
        source = OrthancProcess(workdir / "source", name="source").start()
        try:
            data = iter_dataset(args.instances, size=args.size, seed=11)
            upload_all(source, data, concurrency=8)
            assert source.count() == args.instances
            time.sleep(3)  # past Orthanc's StableAge
            for rtt in rtts:
                delay = rtt / 2
                rounds: list[dict[str, Any]] = []
                with Proxy("127.0.0.1", source.http_port, delay=delay, rate=args.rate) as src:
                    for i in range(args.repeats):
                        for kind in ("bare", "migrator"):
                            label = f"t{int(rtt * 1000)}-{kind}-{i}"
                            print(f"rtt {rtt * 1000:.0f} ms, {kind} round {i + 1}...", flush=True)
                            result = run_once(kind, workdir, label, src, delay, args)
                            print(f"  {result}", flush=True)
                            rounds.append(result)
                summary = {}
                for kind in ("bare", "migrator"):
                    times = [r["seconds"] for r in rounds if r["kind"] == kind]
                    summary[kind] = {
                        "median": statistics.median(times),
                        "min": min(times),
                        "max": max(times),
                        "all_complete": all(r["complete"] for r in rounds if r["kind"] == kind),
                    }
                ratio = summary["migrator"]["median"] / summary["bare"]["median"]
                doc["rtts"][str(rtt)] = {"rounds": rounds, "summary": summary, "ratio": ratio}
                for kind in ("bare", "migrator"):
                    s = summary[kind]
                    rows.append([f"{rtt * 1000:.0f} ms", kind, f"{s['median']:.2f}",
                                 f"{s['min']:.2f}-{s['max']:.2f}", s["all_complete"],
                                 f"{ratio:.2f}" if kind == "migrator" else ""])  # fmt: skip
        finally:
            source.stop(graceful=False)
    print(
        f"{args.instances} instances of {args.size}x{args.size} px, "
        f"link {args.rate / 1e6:.1f} MB/s each way"
    )
    print_table(["rtt", "client", "median s", "spread s", "complete", "migrator/bare"], rows)
    write_results("batch", doc)


if __name__ == "__main__":
    main()
