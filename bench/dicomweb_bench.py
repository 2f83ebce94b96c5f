"""Benchmark: DICOMweb ends against Orthancs running Debian's DICOMweb plugin.

N small synthetic instances (2,000 by default) are copied, each round into a fresh
target, with the target (or the source) reached through a proxy adding ``rtt / 2`` each
way:

1. ``dicomweb->orthanc``: ``migrator replicate dicomweb+http://SRC/dicom-web http://TGT``
   (QIDO-RS listing, WADO-RS fetch, REST store), every target file's MD5 checked against
   the source's;
2. ``orthanc->dicomweb``: ``migrator replicate http://SRC dicomweb+http://TGT/dicom-web``
   (no flag: several instances per STOW-RS request, as many as the engine decides from
   the measured round trips);
3. ``orthanc->orthanc --batch 1``: the same copy by one ``POST /instances`` per instance,
   the baseline STOW-RS is held against;
4. the stores alone, without migrator: the files POSTed with 16 connections one per
   ``POST /instances``, one per STOW-RS request, and k per STOW-RS request
   (`DicomWebTarget.store_many`), to show what multi-instance STOW would bring.

Rounds of the same copy alternate with the others (`--repeats`); medians are shown.

    .venv/bin/python bench/dicomweb_bench.py [--instances 2000] [--rtts 0,0.02]
        [--stow-batch 20] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import machine_facts, migrator_cmd, print_table, work_folder, write_results

from migrator.config import Settings
from migrator.ends.dicomweb import open_dicomweb_target
from migrator.testkit import OrthancProcess, Proxy, upload_all
from migrator.testkit.fastgen import fast_dataset

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB = {"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


def _orthanc(workdir: Path, label: str) -> OrthancProcess:
    return OrthancProcess(workdir / label, name=label, extra=DICOMWEB).start()


def _replicate(source: str, target: str, ledger: Path, *extra: str) -> float:
    cmd = [*migrator_cmd(), "replicate", source, target, "--ledger", f"sqlite:///{ledger}",
           "--progress", "none", *extra]  # fmt: skip
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def _same_files(source: OrthancProcess, target: OrthancProcess) -> bool:
    ids = source.instance_ids()
    if sorted(ids) != sorted(target.instance_ids()):
        return False
    return all(source.md5(i) == target.md5(i) for i in ids)


async def _bare_stores(files: list[bytes], url: str, mode: str, k: int) -> float:
    """Wall time of storing `files` with 16 concurrent requests, without migrator."""
    import httpx

    began = time.monotonic()
    gate = asyncio.Semaphore(16)
    if mode == "rest":
        # Idle connections dropped before Orthanc's 1 s keep-alive closes them under us,
        # and one retry for the race that remains (POST /instances is idempotent).
        limits = httpx.Limits(keepalive_expiry=0.5)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

            async def one(data: bytes) -> None:
                async with gate:
                    for attempt in range(2):
                        try:
                            answer = await http.post(
                                "instances",
                                content=data,
                                headers={"Content-Type": "application/dicom"},
                            )
                            break
                        except httpx.TransportError:
                            if attempt:
                                raise
                    answer.raise_for_status()

            await asyncio.gather(*(one(d) for d in files))
    else:
        target = open_dicomweb_target("dicomweb+" + url + "dicom-web", Settings(concurrency=16))
        groups = [files[i : i + k] for i in range(0, len(files), k)]

        async def many(group: list[bytes]) -> None:
            async with gate:
                outcomes = await target.store_many(group)
                assert all(not isinstance(o, Exception) for o in outcomes), outcomes

        try:
            await asyncio.gather(*(many(g) for g in groups))
        finally:
            await target.aclose()
    return time.monotonic() - began


def copy_round(work: Path, source: OrthancProcess, name: str, rtt: float) -> tuple[float, bool]:
    """One `migrator replicate` of the whole source into a fresh target: seconds, and
    whether the target then holds the source's files exactly."""
    label = f"{name.replace('->', '-').replace(' ', '')}-{int(rtt * 1000)}-{time.time_ns()}"
    target = _orthanc(work, label)
    # The far end is behind the link: the source for a DICOMweb source, else the target.
    far = source if name.startswith("dicomweb") else target
    proxy = Proxy("127.0.0.1", far.http_port, delay=rtt / 2).start()
    src = proxy.url if far is source else source.url
    tgt = proxy.url if far is target else target.url
    try:
        if name == "dicomweb->orthanc":
            seconds = _replicate("dicomweb+" + src + "dicom-web", tgt, work / f"{label}.db")
        elif name == "orthanc->dicomweb":
            seconds = _replicate(src, "dicomweb+" + tgt + "dicom-web", work / f"{label}.db")
        else:
            seconds = _replicate(src, tgt, work / f"{label}.db", "--batch", "1")
        return seconds, _same_files(source, target)
    finally:
        proxy.stop()
        target.stop(graceful=False)


def bare_round(work: Path, files: list[bytes], mode: str, k: int, rtt: float) -> tuple[float, bool]:
    """The stores alone into a fresh target: seconds, and whether all arrived."""
    target = _orthanc(work, f"bare-{mode}-{k}-{int(rtt * 1000)}-{time.time_ns()}")
    proxy = Proxy("127.0.0.1", target.http_port, delay=rtt / 2).start()
    try:
        seconds = asyncio.run(_bare_stores(files, proxy.url, mode, k))
        return seconds, target.count() == len(files)
    finally:
        proxy.stop()
        target.stop(graceful=False)


COPIES = ("dicomweb->orthanc", "orthanc->dicomweb", "orthanc->orthanc --batch 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rtts", default="0,0.02")
    parser.add_argument("--stow-batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    rtts = [float(r) for r in args.rtts.split(",")]
    files = [d.data for d in fast_dataset(args.instances, seed=7)]
    bares = (("rest", 1), ("stow", 1), ("stow", args.stow_batch))
    times: dict[tuple[str, float], list[float]] = {}
    doc: dict[str, Any] = {"machine": machine_facts(), "instances": args.instances, "rounds": []}
    with work_folder("dicomweb-bench-", keep=args.keep) as work:
        source = _orthanc(work, "source")
        try:
            upload_all(source, files)
            for _ in range(args.repeats):
                for rtt in rtts:
                    for name in COPIES:
                        seconds, ok = copy_round(work, source, name, rtt)
                        print(f"{name} at {rtt} s RTT: {seconds:.1f} s", flush=True)
                        times.setdefault((name, rtt), []).append(seconds)
                        doc["rounds"].append({"copy": name, "rtt": rtt, "s": seconds, "ok": ok})
                        assert ok, f"{name} at {rtt}: the target differs from the source"
                    for mode, k in bares:
                        name = "bare POST /instances x1" if mode == "rest" else f"bare STOW-RS x{k}"
                        seconds, ok = bare_round(work, files, mode, k, rtt)
                        print(f"{name} at {rtt} s RTT: {seconds:.1f} s", flush=True)
                        times.setdefault((name, rtt), []).append(seconds)
                        doc["rounds"].append({"copy": name, "rtt": rtt, "s": seconds, "ok": ok})
                        assert ok, f"{name} at {rtt}: not every instance arrived"
        finally:
            source.stop(graceful=False)
    table = [
        [name, rtt, statistics.median(t), args.instances / statistics.median(t),
         " ".join(f"{x:.1f}" for x in t)]
        for (name, rtt), t in times.items()
    ]  # fmt: skip
    print_table(["copy", "rtt s", "median s", "instances/s", "rounds s"], table)
    write_results("dicomweb", doc)


if __name__ == "__main__":
    main()
