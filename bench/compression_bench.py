"""Benchmark: ``migrator replicate`` from a source that gzips its answers, as Debian ships
Orthanc (``"HttpCompressionEnabled": true``), before and after file downloads ask for
``Accept-Encoding: identity``.

A source Orthanc is filled with N synthetic instances of a few MB (16-bit noise in 12
bits: gzip takes ~14% off, as on much uncompressed pixel data). Then, each into a fresh
target Orthanc, with a fresh SQLite ledger:

1. *before*: the code of ``--old-rev`` (its ``migrator`` and ``migrations`` folders, from
   ``git archive``), source compression on: every file is deflated by the source;
2. *after*: the working tree's code, source compression on;
3. *reference*: the working tree's code, source compression off.

Each run records the run's own time (its summary line), the CPU seconds of the source
Orthanc and of the migrator process, the bytes that crossed from the source (through a
pass-through proxy) and, for the new code, the average time of each leg. The table is
printed and written to ``bench/results/compression-<timestamp>.json``.

    .venv/bin/python bench/compression_bench.py [--instances 60] [--size 1280]
        [--concurrency 8] [--repeats 1] [--old-rev d5ad180~1] [--keep]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    REPO,
    SNAPSHOT,
    Child,
    machine_facts,
    migrator_cmd,
    print_facts,
    print_table,
    proc_cpu_seconds,
    wait_quiet,
    work_folder,
    write_results,
)

from migrator.testkit import OrthancProcess, Proxy, iter_dataset, upload_all

# The last revision whose file downloads accepted gzip.
DEFAULT_OLD_REV = "d5ad180~1"


def old_tree(rev: str, dest: Path) -> Path:
    """The `migrator` and `migrations` folders of `rev`, extracted under `dest`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "migrator", "migrations"],
        capture_output=True,
        check=True,
    ).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_once(
    label: str,
    code: Path,
    source: OrthancProcess,
    workdir: Path,
    args: argparse.Namespace,
    run: int,
) -> dict[str, Any]:
    """One replicate into a fresh target; returns its measurements."""
    target = OrthancProcess(workdir / f"target-{label}-{run}", name="target").start()
    ledger = workdir / f"ledger-{label}-{run}.db"
    log_path = workdir / f"{label}-{run}.log"
    busy = wait_quiet(max_wait=args.wait_quiet)
    try:
        with Proxy("127.0.0.1", source.http_port) as src:
            cmd = [
                *migrator_cmd(), "replicate", src.url, target.url, "--ledger",
                f"sqlite:///{ledger}", "-c", str(args.concurrency), "--progress", "none",
            ]  # fmt: skip
            source_cpu = proc_cpu_seconds(source.pid)
            child = Child.start(cmd, log_path, env={"PYTHONPATH": str(code)})
            code_exit = child.finish(timeout=1800)
            source_cpu = proc_cpu_seconds(source.pid) - source_cpu
            received = src.bytes_down
        held = target.count()
    finally:
        target.stop(graceful=False)
    out = log_path.read_text(errors="replace")
    summary = re.search(r"this run: sent (\d+) \(([\d.]+) (MB|MiB)\) in ([\d.]+) s", out)
    legs = re.search(r"per instance sent: source downloads ([\d.]+) s, target stores ([\d.]+)", out)
    retried = [line for line in out.splitlines() if " INFO retrying " in line]
    if code_exit != 0 or summary is None:
        print(out[-3000:], file=sys.stderr)
    return {
        "variant": label,
        "run": run,
        "exit_code": code_exit,
        "held_by_target": held,
        "sent": int(summary[1]) if summary else 0,
        # Either unit, as the run's summary says it, in MB (10^6 bytes).
        "mb": round(float(summary[2]) * (1.048576 if summary[3] == "MiB" else 1), 1)
        if summary
        else 0.0,
        "elapsed_s": float(summary[4]) if summary else None,
        "source_cpu_s": round(source_cpu, 2),
        "migrator_cpu_s": round(child.cpu_seconds or 0.0, 2),
        "mb_from_source": round(received / 1e6, 1),
        "download_s_avg": float(legs[1]) if legs else None,
        "store_s_avg": float(legs[2]) if legs else None,
        "retries": len(retried),
        "first_retry": retried[0] if retried else None,
        "limiter_lines": [
            line for line in out.splitlines() if "concurrent transfers instead of" in line
        ],
        "machine_busy_before": busy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=60)
    parser.add_argument("--size", type=int, default=1280, help="rows = columns of each image")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--old-rev", default=DEFAULT_OLD_REV)
    parser.add_argument("--wait-quiet", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    facts = machine_facts()
    print_facts(facts)
    results: list[dict[str, Any]] = []
    with work_folder("compression-bench-", keep=args.keep) as workdir:
        old = old_tree(args.old_rev, workdir / "old-code")
        source = OrthancProcess(workdir / "source", name="source", http_compression=True)
        source.start()
        try:
            started = time.monotonic()
            data = iter_dataset(args.instances, seed=7, size=args.size)
            upload_all(source, data)
            print(f"source filled: {source.count()} instances in "
                  f"{time.monotonic() - started:.1f} s")  # fmt: skip
            for run in range(args.repeats):
                results.append(run_once("before", old, source, workdir, args, run))
                results.append(run_once("after", SNAPSHOT, source, workdir, args, run))
            source.http_compression = False
            source.restart()
            for run in range(args.repeats):
                results.append(run_once("reference", SNAPSHOT, source, workdir, args, run))
        finally:
            source.stop(graceful=False)

    print(
        f"\n{args.instances} instances of {args.size}x{args.size} 16-bit pixels, "
        f"-c {args.concurrency}; before = {args.old_rev}"
    )
    print_table(
        ["variant", "source gzip", "exit", "sent", "MB", "time s", "MB over wire",
         "source CPU s", "migrator CPU s", "download s", "store s", "retries", "busy"],
        [[r["variant"], "off" if r["variant"] == "reference" else "on", r["exit_code"],
          r["sent"], r["mb"], r["elapsed_s"], r["mb_from_source"], r["source_cpu_s"],
          r["migrator_cpu_s"], r["download_s_avg"], r["store_s_avg"], r["retries"],
          r["machine_busy_before"]] for r in results],
    )  # fmt: skip
    for r in results:
        for line in [*r["limiter_lines"], *([r["first_retry"]] if r["first_retry"] else [])]:
            print(f"  {r['variant']}: {line}")
    write_results("compression", {"machine": facts, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
