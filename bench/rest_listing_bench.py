"""Benchmark: ``migrator replicate --dry-run`` (the whole process) against a bare
sequential expanded paging of the same source Orthanc.

A source Orthanc is filled with N small synthetic instances (``testkit.fastgen``, ten per
series, two series per study; with ``--keep DIR`` the filled source is kept there and
reused by the next run). Then, in interleaved rounds (A B, B A, A B, ...):

- *bare*: a Python process that pages ``GET /instances?since=&limit=&expand`` with httpx,
  one page after the other, and parses each answer. No ledger, no study UIDs. As httpx
  does by default it accepts gzip (Orthanc then deflates every page); *bare_identity*
  asks for the pages as they are, as migrator does with a source on the same machine.
- *migrator*: ``migrator replicate SRC TGT --dry-run`` into a fresh SQLite ledger (the
  target is an empty Orthanc): the same pages (one request at a time), study and series
  UIDs looked up, the reconciliation and the change log, every row saved.
- *baseline* (with ``--baseline REV``): the same command run by the code of an older
  revision (``git archive``), e.g. the one before pages were requested ahead.

Each run records its wall time and the CPU seconds of the client process and of the
source Orthanc (on a shared machine the CPU figures are the steadier ones). The migrator
ledger is checked after each run: N rows, none without a study UID.

    .venv/bin/python bench/rest_listing_bench.py [--instances 100000] [--rounds 3]
        [--page-size 1000] [--keep DIR] [--wait-quiet 60] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    REPO,
    machine_facts,
    migrator_cmd,
    print_facts,
    print_table,
    proc_cpu_seconds,
    wait_quiet,
    work_folder,
    write_results,
)

from migrator.testkit import OrthancProcess, upload_all
from migrator.testkit.fastgen import iter_fast_dataset

BARE = r"""
import sys, time, httpx
url, size, encoding = sys.argv[1], int(sys.argv[2]), sys.argv[3]
started = time.perf_counter()
listed = 0
headers = {"Accept-Encoding": encoding} if encoding != "default" else {}
with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
    since = 0
    while True:
        page = client.get("instances", params={"since": since, "limit": size, "expand": ""})
        page.raise_for_status()
        items = page.json()
        listed += len(items)
        since += size
        if len(items) < size:
            break
print(listed, time.perf_counter() - started)
"""


def fill(source: OrthancProcess, n: int) -> float:
    """Upload instances until the source holds `n`; seconds taken."""
    started = time.perf_counter()
    have = source.count()
    if have < n:
        print(f"filling the source: {have} -> {n} instances...", flush=True)
        data = (i.data for i in iter_fast_dataset(n - have, seed=1000 + have))
        upload_all(source, data, concurrency=4)
    return time.perf_counter() - started


def timed(cmd: list[str], source: OrthancProcess, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run `cmd` to completion: wall, its CPU, the source Orthanc's CPU, its output. It
    runs in `cwd`, not in the checkout: ``python -m`` imports from its folder first."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    orthanc0 = proc_cpu_seconds(source.pid)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=cwd)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {
        "wall_s": round(wall, 3),
        "client_cpu_s": round(
            (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3
        ),
        "source_cpu_s": round(proc_cpu_seconds(source.pid) - orthanc0, 3),
        "stdout": done.stdout.strip(),
    }


def run_bare(
    source: OrthancProcess, work: Path, size: int, n: int, encoding: str
) -> dict[str, Any]:
    cmd = [sys.executable, "-c", BARE, source.url, str(size), encoding]
    out = timed(cmd, source, dict(os.environ), work)
    listed, loop = out.pop("stdout").split()
    assert int(listed) == n, listed
    out["loop_s"] = round(float(loop), 3)
    return out


def baseline_code(rev: str, work: Path) -> Path:
    """The package and migrations of revision `rev`, extracted under `work`."""
    dest = work / "baseline"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "migrator", "migrations"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_migrator(
    source: OrthancProcess,
    target: OrthancProcess,
    work: Path,
    size: int,
    n: int,
    k: int,
    code: Path | None = None,
) -> dict[str, Any]:
    """One dry run; `code`: the folder of an older revision's package to run instead."""
    ledger = work / f"ledger-{k}.db"
    config = work / "migrator.toml"
    config.write_text(f"page_size = {size}\n")
    env = {**os.environ, "MIGRATOR_PROGRESS": "none"}
    program = migrator_cmd()
    if code is not None:
        env["PYTHONPATH"] = str(code)
        program = [sys.executable, "-m", "migrator"]
    cmd = [
        *program,
        *("replicate", source.url, target.url, "--dry-run"),
        *("--ledger", f"sqlite:///{ledger}", "--config", str(config)),
    ]
    out = timed(cmd, source, env, work)
    out.pop("stdout")
    with sqlite3.connect(ledger) as conn:
        rows, no_study = conn.execute(
            "SELECT COUNT(*), SUM(study_uid IS NULL) FROM instances"
        ).fetchone()
    assert rows == n and (code is not None or not no_study), (rows, no_study)
    out["rows_without_study"] = no_study
    for path in work.glob(f"ledger-{k}.db*"):
        path.unlink()
    return out


def summary(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in runs]
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--keep", type=Path, help="folder of a source Orthanc to reuse")
    parser.add_argument("--wait-quiet", type=float, default=60.0)
    parser.add_argument("--baseline", help="also run the code of this git revision")
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    with work_folder("rest-listing-bench-") as work:
        where = args.keep.resolve() if args.keep else work / "source"
        source = OrthancProcess(where, name="source").start()
        target = OrthancProcess(work / "target", name="target").start()
        try:
            fill_s = fill(source, args.instances)
            n = source.count()
            runs: dict[str, list[dict[str, Any]]] = {
                "bare": [],
                "migrator": [],
                "bare_identity": [],
            }
            old = baseline_code(args.baseline, work) if args.baseline else None
            if old is not None:
                runs["baseline"] = []
            names = list(runs)
            for k in range(args.rounds):
                order = names if k % 2 == 0 else names[::-1]
                for name in order:
                    busy = wait_quiet(max_wait=args.wait_quiet)
                    if name.startswith("bare"):
                        encoding = "identity" if name == "bare_identity" else "default"
                        out = run_bare(source, work, args.page_size, n, encoding)
                    else:
                        code = old if name == "baseline" else None
                        out = run_migrator(source, target, work, args.page_size, n, k, code)
                    out["machine_busy_before"] = busy
                    runs[name].append(out)
                    print(f"round {k + 1} {name}: {out}", flush=True)
        finally:
            source.stop()
            target.stop()
    table = []
    for name, rs in runs.items():
        wall, cpu, src = (summary(rs, k) for k in ("wall_s", "client_cpu_s", "source_cpu_s"))
        table.append(
            [
                name,
                f"{wall['median']:.2f} ({wall['min']:.2f}-{wall['max']:.2f})",
                f"{cpu['median']:.2f}",
                f"{src['median']:.2f}",
            ]
        )
    print(f"\n{n} instances, page size {args.page_size}, {args.rounds} rounds (median, range)")
    print_table(["run", "wall s", "client CPU s", "source Orthanc CPU s"], table)
    bare = statistics.median(r["wall_s"] for r in runs["bare"])
    ratio = statistics.median(r["wall_s"] for r in runs["migrator"]) / bare
    print(f"migrator / bare (median wall): {ratio:.2f}")
    if "baseline" in runs:
        before = statistics.median(r["wall_s"] for r in runs["baseline"]) / bare
        print(f"baseline {args.baseline} / bare (median wall): {before:.2f}")
    write_results(
        "rest-listing",
        {
            "machine": facts,
            "instances": n,
            "page_size": args.page_size,
            "baseline": args.baseline,
            "fill_s": round(fill_s, 1),
            "runs": runs,
            "ratio_median_wall": round(ratio, 3),
        },
    )


if __name__ == "__main__":
    main()
