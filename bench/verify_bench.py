"""Benchmark: ``migrator verify`` against a bare concurrent loop of the same MD5 requests.

A target Orthanc holds N small synthetic instances and is reached through a
:class:`migrator.testkit.Proxy` that adds ``rtt / 2`` of latency each way. The ledger is
filled directly with N `sent` rows (Orthanc ID and MD5 of each file). Then, alternately:

1. *bare*: a subprocess that GETs ``/instances/{id}/attachments/dicom/md5`` for every ID
   with C connections (asyncio + httpx, the same client settings), comparing nothing and
   writing nothing;
2. *verify*: ``migrator verify --all -c C --json`` as a subprocess: reads the ledger in
   pages, checks, writes every result back in batches.

Both are timed as wall time of the process and as the loop time each one reports. Goal:
verify within 1.5x of the bare loop.

    .venv/bin/python bench/verify_bench.py [--instances 2000] [--rtt 0.02] [--concurrency 16]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from migrator.ledger.store import Ledger
from migrator.testkit import OrthancProcess, Proxy, iter_dataset, upload_all

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

BARE = r"""
import asyncio, sys, time, httpx
from migrator.ends.orthanc.client import KEEPALIVE_EXPIRY

async def main(url, ids, concurrency):
    limits = httpx.Limits(max_connections=concurrency + 2,
                          max_keepalive_connections=concurrency + 2,
                          keepalive_expiry=KEEPALIVE_EXPIRY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        queue = asyncio.Queue()
        for i in ids:
            queue.put_nowait(i)
        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                for attempt in range(4):
                    try:
                        r = await client.get(f"instances/{i}/attachments/dicom/md5")
                        break
                    except httpx.TransportError:
                        if attempt == 3:
                            raise
                r.raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started

url, path, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = open(path).read().split()
print(asyncio.run(main(url, ids, concurrency)))
"""


def fill_ledger(url: str, target_url: str, rows: list[tuple[str, str, int]]) -> None:
    """One replicate job whose rows are all `sent`, as a replication would leave them."""
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job("bench", "replicate", "http://source:8042/", target_url, {})
        ledger.save_listing(
            job.id,
            [
                {"source_key": oid, "orthanc_id": oid, "md5": md5, "size": size}
                for oid, md5, size in rows
            ],
            None,
            done=True,
        )
        with ledger._write() as conn:
            conn.exec_driver_sql(
                "UPDATE instances SET state = 'sent', target_status = 'Success', "
                f"attempts = 1, sent_at = {time.time()}"
            )
    finally:
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rtt", type=float, default=0.02)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    target = OrthancProcess(work / "target", name="target").start()
    try:
        rows = []

        def files():
            for inst in iter_dataset(args.instances, seed=77):
                rows.append((inst.orthanc_id, hashlib.md5(inst.data).hexdigest(), len(inst.data)))
                yield inst.data

        upload_all(target, files())
        ids_path = work / "ids.txt"
        ids_path.write_text("\n".join(oid for oid, _, _ in rows))
        ledger_url = f"sqlite:///{work / 'ledger.db'}"
        with Proxy("127.0.0.1", target.http_port, delay=args.rtt / 2) as proxy:
            fill_ledger(ledger_url, proxy.url, rows)
            bare_wall, bare_loop, verify_wall, verify_loop = [], [], [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-c", BARE, proxy.url, str(ids_path), str(args.concurrency)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                bare_wall.append(time.perf_counter() - started)
                bare_loop.append(float(out.strip()))
                started = time.perf_counter()
                result = subprocess.run(
                    [sys.executable, "-m", "migrator", "verify", "--all", "--no-studies",
                     "--json", "-c", str(args.concurrency), "--ledger", ledger_url],
                    capture_output=True,
                    text=True,
                )  # fmt: skip
                verify_wall.append(time.perf_counter() - started)
                assert result.returncode == 0, result.stderr
                (job,) = json.loads(result.stdout)["jobs"]
                assert job["match"] == job["checked"] == args.instances, job
                verify_loop.append(job["elapsed"])
    finally:
        target.stop(graceful=False)

    med = statistics.median
    table = {
        "instances": args.instances,
        "rtt": args.rtt,
        "concurrency": args.concurrency,
        "bare_loop_s": med(bare_loop),
        "bare_wall_s": med(bare_wall),
        "verify_loop_s": med(verify_loop),
        "verify_wall_s": med(verify_wall),
        "ratio_loop": med(verify_loop) / med(bare_loop),
        "ratio_wall": med(verify_wall) / med(bare_wall),
        "runs": {"bare_loop": bare_loop, "bare_wall": bare_wall, "verify_loop": verify_loop,
                 "verify_wall": verify_wall},
    }  # fmt: skip
    print(f"{args.instances} instances, RTT {args.rtt * 1000:.0f} ms, -c {args.concurrency}")
    print(f"  bare loop    {table['bare_loop_s']:.2f} s   (process {table['bare_wall_s']:.2f} s)")
    print(
        f"  verify pass  {table['verify_loop_s']:.2f} s   (process {table['verify_wall_s']:.2f} s)"
    )
    print(f"  ratio        {table['ratio_loop']:.2f}x loop, {table['ratio_wall']:.2f}x process")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"verify-{datetime.now():%Y%m%d-%H%M%S}.json"
    out_path.write_text(json.dumps(table, indent=2))
    print(f"results: {out_path}")


if __name__ == "__main__":
    main()
