"""Import benchmark: `migrator import` of a folder against a bare concurrent POST loop over
the same files, and the listing of a 100,000-instance Orthanc index into a ledger.

    .venv/bin/python bench/import_bench.py [--instances 2000] [--concurrency 8]
        [--rounds 5] [--index-instances 100000] [--index-rounds 3]

Goals (issue "Upgrade recovery"): the import reaches at least 90% of the bare loop's rate;
listing the index into the ledger takes under 5 s.

Each round starts two fresh Orthancs and runs the bare loop and `migrator import` (a new
process, a new SQLite ledger), alternating which goes first. Both share this machine's
CPUs with the Orthancs, so single runs vary by ±30%: the medians over rounds are the
result. The migrator's rate is given twice: over the job (the run recorded in the
ledger: listing, classification, ledger writes and sending, as the tool reports it) and
over the whole process (plus interpreter start-up, imports, preflight, ledger creation).
The bare loop's time covers its POSTs only (its file list is built beforehand).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    Child,
    machine_facts,
    migrator_cmd,
    print_facts,
    print_table,
    proc_cpu_seconds,
    wait_quiet,
    write_results,
)
from index_listing import build_index

from migrator.testkit.dicomgen import iter_dataset
from migrator.testkit.orthanc import OrthancProcess


def write_folder(root: Path, n: int) -> list[Path]:
    """Write `n` small DICOM files in a two-level tree."""
    paths = []
    for i, inst in enumerate(iter_dataset(n, seed=7)):
        path = root / f"{i // 500:03d}" / f"{i:06d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(inst.data)
        paths.append(path)
    return paths


async def bare_post_loop(url: str, paths: list[Path], concurrency: int) -> float:
    """POST every file with `concurrency` workers; no ledger, no classification."""
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=0.7)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            while not queue.empty():
                data = queue.get_nowait().read_bytes()
                for _ in range(5):
                    try:
                        response = await client.post(
                            "instances", content=data, headers={"Content-Type": "application/dicom"}
                        )
                        response.raise_for_status()
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def job_seconds(ledger: Path) -> float:
    """How long the one run recorded in an SQLite ledger took (its own clock)."""
    with sqlite3.connect(ledger) as db:
        (seconds,) = db.execute("SELECT finished_at - started_at FROM runs").fetchone()
    return float(seconds)


def run_bare(work: Path, paths: list[Path], concurrency: int) -> dict[str, float]:
    """One bare loop into a fresh Orthanc."""
    with OrthancProcess(work, name="bare") as target:
        cpu0, orthanc0 = time.process_time(), proc_cpu_seconds(target.pid)
        wall = asyncio.run(bare_post_loop(target.url, paths, concurrency))
        result = {
            "wall": wall,
            "client_cpu": time.process_time() - cpu0,
            "orthanc_cpu": proc_cpu_seconds(target.pid) - orthanc0,
        }
        assert target.count() == len(paths)
    return result


def run_migrator(work: Path, folder: Path, n: int, concurrency: int) -> dict[str, float]:
    """One `migrator import` process into a fresh Orthanc, with a new ledger."""
    ledger = work / "ledger.db"
    with OrthancProcess(work / "orthanc", name="migrator") as target:
        orthanc0 = proc_cpu_seconds(target.pid)
        cmd = [
            *migrator_cmd(),
            "import",
            str(folder),
            target.url,
            "-c",
            str(concurrency),
            "--ledger",
            f"sqlite:///{ledger}",
            "--progress",
            "none",
        ]
        child = Child.start(cmd, work / "migrator.log")
        code = child.finish(timeout=600)
        assert code == 0, child.log_tail()
        assert child.ended is not None and child.cpu_seconds is not None
        orthanc_cpu = proc_cpu_seconds(target.pid) - orthanc0
        assert target.count() == n
    return {
        "wall": child.ended - child.started,
        "job": job_seconds(ledger),
        "client_cpu": child.cpu_seconds,
        "orthanc_cpu": orthanc_cpu,
    }


def list_index(work: Path, n: int, target_url: str) -> dict[str, float]:
    """`migrator import --dry-run` of an index of `n` instances into a new ledger."""
    store = work / "index-store"
    if not store.exists():
        store.mkdir(parents=True)
        build_index(str(store / "index"), n)
    ledger = work / f"index-{time.monotonic_ns()}.db"
    cmd = [
        *migrator_cmd(),
        "import",
        str(store),
        target_url,
        "--dry-run",
        "--ledger",
        f"sqlite:///{ledger}",
        "--progress",
        "none",
    ]
    child = Child.start(cmd, work / "index.log")
    assert child.finish(timeout=600) == 0, child.log_tail()
    assert child.ended is not None
    job = job_seconds(ledger)
    with sqlite3.connect(ledger) as db:
        (rows,) = db.execute("SELECT count(*) FROM instances").fetchone()
    assert rows == n, rows
    ledger.unlink()
    return {"wall": child.ended - child.started, "job": job, "cpu": child.cpu_seconds or 0.0}


def median(rows: list[dict[str, float]], key: str) -> float:
    """Median of one field over rounds."""
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--index-instances", type=int, default=100_000)
    parser.add_argument("--index-rounds", type=int, default=3)
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    n = args.instances
    bare_runs: list[dict[str, float]] = []
    mig_runs: list[dict[str, float]] = []
    index_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        root = Path(tmp)
        paths = write_folder(root / "files", n)
        for p in paths:  # warm the page cache for both alike
            p.read_bytes()
        for k in range(args.rounds):
            quiet = wait_quiet()
            order = ["bare", "migrator"] if k % 2 == 0 else ["migrator", "bare"]
            for what in order:
                work = root / f"r{k}-{what}"
                work.mkdir()
                if what == "bare":
                    bare_runs.append({**run_bare(work, paths, args.concurrency), "quiet": quiet})
                else:
                    mig_runs.append(run_migrator(work, root / "files", n, args.concurrency))
            b, m = bare_runs[-1], mig_runs[-1]
            print(
                f"round {k + 1}: bare {b['wall']:.2f} s, migrator job {m['job']:.2f} s "
                f"(process {m['wall']:.2f} s); job/bare rate {b['wall'] / m['job']:.2f}"
            )
        with OrthancProcess(root / "index-target", name="index-target") as target:
            for _ in range(args.index_rounds):
                wait_quiet()
                index_runs.append(list_index(root, args.index_instances, target.url))

    rows: list[list[Any]] = []
    for label, runs, key in (
        ("bare POST loop", bare_runs, "wall"),
        ("migrator import: job", mig_runs, "job"),
        ("migrator import: process", mig_runs, "wall"),
    ):
        seconds = median(runs, key)
        rows.append(
            [
                label,
                seconds,
                n / seconds,
                median(bare_runs, "wall") / seconds,
                median(runs, "client_cpu") * 1000 / n,
                median(runs, "orthanc_cpu") * 1000 / n,
            ]
        )
    print(f"\n{n} instances, concurrency {args.concurrency}, median of {args.rounds} rounds")
    print_table(
        ["run", "seconds", "inst/s", "rate vs bare", "client CPU ms/inst", "Orthanc CPU ms/inst"],
        rows,
    )
    ratios = sorted(b["wall"] / m["job"] for b, m in zip(bare_runs, mig_runs, strict=True))
    print(f"per-round job/bare rate ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(
        f"index of {args.index_instances} instances listed into the ledger "
        f"(import --dry-run, median of {args.index_rounds}): process "
        f"{median(index_runs, 'wall'):.2f} s, job {median(index_runs, 'job'):.2f} s "
        f"(goal < 5 s)"
    )
    write_results(
        "import",
        {
            "machine": facts,
            "instances": n,
            "concurrency": args.concurrency,
            "bare": bare_runs,
            "migrator": mig_runs,
            "index_instances": args.index_instances,
            "index": index_runs,
        },
    )


if __name__ == "__main__":
    main()
