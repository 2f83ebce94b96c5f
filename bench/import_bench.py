"""Import benchmark: `migrator import` of a folder against a bare concurrent POST loop over
the same files, and the listing of a 100,000-instance Orthanc index into a ledger.

    .venv/bin/python bench/import_bench.py [--instances 2000] [--concurrency 8]
        [--index-instances 100000]

Goals (issue "Upgrade recovery"): the import reaches at least 90% of the bare loop's rate;
listing the index into the ledger takes under 5 s. Both ends share this machine's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from index_listing import build_index

from migrator.testkit.dicomgen import iter_dataset
from migrator.testkit.orthanc import OrthancProcess

MIGRATOR = [sys.executable, "-m", "migrator"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--index-instances", type=int, default=100_000)
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()} (shared by the Orthanc processes and the clients)")
    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        root = Path(tmp)
        paths = write_folder(root / "files", args.instances)
        for p in paths:  # warm the page cache for both runs alike
            p.read_bytes()
        (root / "a").mkdir()
        (root / "b").mkdir()
        with OrthancProcess(root / "a", name="bare") as bare_target:
            bare = asyncio.run(bare_post_loop(bare_target.url, paths, args.concurrency))
            assert bare_target.count() == args.instances
        with OrthancProcess(root / "b", name="migrator") as target:
            started = time.perf_counter()
            done = subprocess.run(
                [
                    *MIGRATOR,
                    "import",
                    str(root / "files"),
                    target.url,
                    "-c",
                    str(args.concurrency),
                    "--ledger",
                    f"sqlite:///{root / 'l.db'}",
                    "--progress",
                    "none",
                ],
                capture_output=True,
                text=True,
            )
            migrated = time.perf_counter() - started
            assert done.returncode == 0, done.stderr
            assert target.count() == args.instances
            startup_started = time.perf_counter()
            subprocess.run([*MIGRATOR, "--help"], capture_output=True, check=True)
            startup = time.perf_counter() - startup_started

            index_dir = root / "index-store"
            index_dir.mkdir()
            build_index(str(index_dir / "index"), args.index_instances)
            started = time.perf_counter()
            listed = subprocess.run(
                [
                    *MIGRATOR,
                    "import",
                    str(index_dir),
                    target.url,
                    "--dry-run",
                    "--ledger",
                    f"sqlite:///{root / 'index.db'}",
                    "--progress",
                    "none",
                ],
                capture_output=True,
                text=True,
            )
            listing = time.perf_counter() - started
            assert listed.returncode == 0, listed.stderr

    rate_bare = args.instances / bare
    rate_migrator = args.instances / migrated
    print(f"{'run':<34}{'seconds':>10}{'inst/s':>10}")
    print(f"{'bare POST loop':<34}{bare:>10.2f}{rate_bare:>10.1f}")
    print(f"{'migrator import (process)':<34}{migrated:>10.2f}{rate_migrator:>10.1f}")
    print(f"{'migrator start-up (--help)':<34}{startup:>10.2f}")
    print(
        f"rate ratio migrator/bare: {rate_migrator / rate_bare:.2f} (goal >= 0.90); "
        f"without start-up: {args.instances / (migrated - startup) / rate_bare:.2f}"
    )
    print(
        f"index of {args.index_instances} instances listed into the ledger "
        f"(import --dry-run, whole process): {listing:.2f} s (goal < 5 s)"
    )


if __name__ == "__main__":
    main()
