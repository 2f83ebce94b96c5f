"""Benchmark: DICOMweb ends against Orthancs running Debian's DICOMweb plugin.

N small synthetic instances (2,000 by default) are copied, each round into a fresh
target, with the target (or the source) reached through a proxy adding ``rtt / 2`` each
way:

1. ``dicomweb->orthanc``: ``migrator replicate dicomweb+http://SRC/dicom-web http://TGT``
   (QIDO-RS listing, WADO-RS fetch, REST store), every target file's MD5 checked against
   the source's;
2. ``orthanc->dicomweb``: ``migrator replicate http://SRC dicomweb+http://TGT/dicom-web``
   (one STOW-RS request per instance, as the engine sends it);
3. ``orthanc->orthanc --batch 1``: the same copy by one ``POST /instances`` per instance,
   the baseline STOW-RS is held against;
4. the stores alone, without migrator: the files POSTed with 16 connections one per
   ``POST /instances``, one per STOW-RS request, and k per STOW-RS request
   (`DicomWebTarget.store_many`), to show what multi-instance STOW would bring.

    .venv/bin/python bench/dicomweb_bench.py [--instances 2000] [--rtts 0,0.02]
        [--stow-batch 20] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
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
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:

            async def one(data: bytes) -> None:
                async with gate:
                    answer = await http.post(
                        "instances", content=data, headers={"Content-Type": "application/dicom"}
                    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rtts", default="0,0.02")
    parser.add_argument("--stow-batch", type=int, default=20)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    rtts = [float(r) for r in args.rtts.split(",")]
    data = fast_dataset(args.instances, seed=7)
    files = [d.data for d in data]
    rows: list[list[Any]] = []
    doc: dict[str, Any] = {"machine": machine_facts(), "instances": args.instances, "rounds": []}
    with work_folder("dicomweb-bench-", keep=args.keep) as work:
        source = _orthanc(work, "source")
        try:
            upload_all(source, files)
            for rtt in rtts:
                for name in ("dicomweb->orthanc", "orthanc->dicomweb", "orthanc->orthanc"):
                    label = f"{name.replace('->', '-')}-{int(rtt * 1000)}"
                    target = _orthanc(work, label)
                    # The far end is behind the link: the source for a DICOMweb source,
                    # the target otherwise.
                    far = source if name.startswith("dicomweb") else target
                    proxy = Proxy("127.0.0.1", far.http_port, delay=rtt / 2).start()
                    near_src = proxy.url if far is source else source.url
                    near_tgt = proxy.url if far is target else target.url
                    try:
                        if name == "dicomweb->orthanc":
                            ends = ("dicomweb+" + near_src + "dicom-web", near_tgt)
                            extra: tuple[str, ...] = ()
                        elif name == "orthanc->dicomweb":
                            ends = (near_src, "dicomweb+" + near_tgt + "dicom-web")
                            extra = ()
                        else:
                            ends, extra = (near_src, near_tgt), ("--batch", "1")
                        seconds = _replicate(*ends, work / f"{label}.db", *extra)
                        same = _same_files(source, target)
                    finally:
                        proxy.stop()
                        target.stop(graceful=False)
                    rate = args.instances / seconds
                    rows.append([name + (" --batch 1" if extra else ""), rtt, seconds, rate, same])
                    doc["rounds"].append(
                        {"copy": name, "rtt": rtt, "seconds": seconds, "identical": same}
                    )
                # The stores alone, through the same kind of link.
                for mode, k in (("rest", 1), ("stow", 1), ("stow", args.stow_batch)):
                    label = f"bare-{mode}-{k}-{int(rtt * 1000)}"
                    target = _orthanc(work, label)
                    proxy = Proxy("127.0.0.1", target.http_port, delay=rtt / 2).start()
                    try:
                        seconds = asyncio.run(_bare_stores(files, proxy.url, mode, k))
                        stored = target.count() == args.instances
                    finally:
                        proxy.stop()
                        target.stop(graceful=False)
                    what = "POST /instances x1" if mode == "rest" else f"STOW-RS x{k}"
                    rows.append([f"bare {what}", rtt, seconds, args.instances / seconds, stored])
                    doc["rounds"].append(
                        {"copy": f"bare {what}", "rtt": rtt, "seconds": seconds, "ok": stored}
                    )
        finally:
            source.stop(graceful=False)
    print_table(["copy", "rtt s", "seconds", "instances/s", "identical"], rows)
    write_results("dicomweb", doc)


if __name__ == "__main__":
    main()
