"""Benchmark: ``migrator diff`` against listing both servers, on N instances.

A source Orthanc is filled with N small synthetic instances (``testkit.fastgen``, ten per
series, two series per study, posted as ZIP archives); the target starts as a copy of the
source's storage and index (made while the source is stopped, which is far quicker than
a replicate). Then ``--delete`` instances are deleted from the target and ``--add`` new
ones stored on the source, so that the diff has something to find. With ``--keep DIR``
the filled source is kept there and reused by the next run.

In interleaved rounds:

- *diff*: ``migrator diff SRC TGT --json`` as a user runs it (the whole process); its
  answer is checked: missing = deleted + added, extra = 0.
- *listing*: one process that lists both servers one after the other as a comparison
  without inventories must: pages of ``GET /instances?since=&limit=1000&expand`` (IDs,
  SOPInstanceUIDs, series), parsed, no study lookup, nothing saved. The goal is a diff
  faster than *listing twice* (2 x this time); the table also shows it against one.

    .venv/bin/python bench/diff_bench.py [--instances 100000] [--rounds 3] [--keep DIR]
        [--delete 1000] [--add 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
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

from migrator.testkit.fastgen import iter_fast_dataset
from migrator.testkit.orthanc import OrthancProcess

ZIP_MEMBERS = 500


def _zips(n: int, seed: int) -> Any:
    members: list[bytes] = []
    for inst in iter_fast_dataset(n, seed=seed):
        members.append(inst.data)
        if len(members) == ZIP_MEMBERS:
            yield members
            members = []
    if members:
        yield members


def fill(server: OrthancProcess, n: int, seed: int) -> None:
    """Store `n` synthetic instances, posted as ZIP archives (three at a time)."""

    def post(members: list[bytes]) -> int:
        body = io.BytesIO()
        with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as archive:
            for i, data in enumerate(members):
                archive.writestr(f"{i}.dcm", data)
        with server.client(timeout=600) as http:
            answer = http.post(
                "instances", content=body.getvalue(), headers={"Content-Type": "application/zip"}
            )
            answer.raise_for_status()
            return len(answer.json())

    with ThreadPoolExecutor(3) as pool:
        stored = sum(pool.map(post, _zips(n, seed)))
    assert stored == n, f"{stored} of {n} stored"


def servers(folder: Path, n: int) -> tuple[OrthancProcess, OrthancProcess]:
    """The source (N instances, kept in `folder`) and a target copied from it."""
    source = OrthancProcess(folder / "source", name="source")
    marker = folder / f"filled-{n}"
    if not marker.exists():
        shutil.rmtree(folder / "source", ignore_errors=True)
        source.start()
        started = time.monotonic()
        fill(source, n, seed=7)
        print(f"source filled with {n} instances in {time.monotonic() - started:.0f} s")
        source.stop()
        marker.touch()
    shutil.rmtree(folder / "target", ignore_errors=True)
    shutil.rmtree(folder / "run", ignore_errors=True)
    # The kept source stays as filled: this run works on copies of it.
    shutil.copytree(folder / "source" / "storage", folder / "run" / "storage")
    shutil.copytree(folder / "source" / "storage", folder / "target" / "storage")
    return (
        OrthancProcess(folder / "run", name="source").start(),
        OrthancProcess(folder / "target", name="target").start(),
    )


def listing_process(urls: list[str]) -> float:
    """Seconds a fresh process takes to page every server's expanded instances."""
    code = (
        "import sys, time, httpx\n"
        "t = time.monotonic()\n"
        "for url in sys.argv[1:]:\n"
        "    with httpx.Client(base_url=url, timeout=600,"
        " headers={'Accept-Encoding': 'identity'}) as c:\n"
        "        since = 0\n"
        "        while True:\n"
        "            page = c.get('instances', params={'since': since, 'limit': 1000,"
        " 'expand': ''}).json()\n"
        "            since += len(page)\n"
        "            if len(page) < 1000: break\n"
        "print(time.monotonic() - t)\n"
    )
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code, *urls], check=True, capture_output=True)
    return time.monotonic() - started


def diff_process(source: str, target: str, expected: int) -> tuple[float, dict[str, Any]]:
    """Seconds of a whole `migrator diff --json`, and its document (checked)."""
    started = time.monotonic()
    proc = subprocess.run(
        [*migrator_cmd(), "diff", source, target, "--json", "--max-list", "10"],
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == (1 if expected else 0), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["missing"] == expected and doc["extra"] == 0, doc
    return elapsed, doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delete", type=int, default=1000)
    parser.add_argument("--add", type=int, default=1000)
    parser.add_argument("--keep", type=Path, help="Keep the filled source here, reuse it.")
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    kept = contextlib.nullcontext(args.keep) if args.keep else None
    with kept or work_folder("diff-bench") as folder:
        folder.mkdir(parents=True, exist_ok=True)
        source, target = servers(folder, args.instances)
        try:
            doomed = target.instance_ids()[:: max(args.instances // max(args.delete, 1), 1)]
            for orthanc_id in doomed[: args.delete]:
                target.delete_instance(orthanc_id)
            if args.add:
                fill(source, args.add, seed=8)
            expected = min(args.delete, len(doomed)) + args.add
            diffs: list[float] = []
            listings: list[float] = []
            inner: list[float] = []
            for round_no in range(args.rounds):
                order = ("diff", "listing") if round_no % 2 == 0 else ("listing", "diff")
                for what in order:
                    if what == "diff":
                        elapsed, doc = diff_process(source.url, target.url, expected)
                        diffs.append(elapsed)
                        inner.append(doc["seconds"])
                    else:
                        listings.append(listing_process([source.url, target.url]))
        finally:
            source.stop(graceful=False)
            target.stop(graceful=False)
    diff_s, listing_s = statistics.median(diffs), statistics.median(listings)
    rows = [
        ["migrator diff (process)", f"{diff_s:.2f}", "", ""],
        ["  of which inventories + comparison", f"{statistics.median(inner):.2f}", "", ""],
        ["listing both servers once", f"{listing_s:.2f}", f"{listing_s / diff_s:.1f}x", ""],
        [
            "listing both servers twice",
            f"{2 * listing_s:.2f}",
            f"{2 * listing_s / diff_s:.1f}x",
            "",
        ],
    ]
    print(
        f"\n{args.instances} instances on the source ({args.delete} deleted on the target, "
        f"{args.add} added to the source), medians of {args.rounds} rounds:"
    )
    print_table(["run", "seconds", "diff faster by", ""], rows)
    write_results(
        "diff_bench",
        {
            "machine": facts,
            "instances": args.instances,
            "deleted": args.delete,
            "added": args.add,
            "diff_seconds": diffs,
            "diff_inner_seconds": inner,
            "listing_both_seconds": listings,
        },
    )


if __name__ == "__main__":
    main()
