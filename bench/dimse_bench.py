"""Benchmark: the DIMSE ends against DCMTK and a PacsMigrator-style retrieval.

N synthetic instances (2,000 by default; ``--size S``: S x S 8-bit pixels each, 32 by
default, 724 for the bytes of a 512 x 512 16-bit CT slice, ~0.5 MiB):

1. C-STORE: the N files of a folder sent to one local DCMTK ``storescp`` (``--fork``:
   one process per association, and again without it: one association at a time), by
   ``migrator import FOLDER dicom://STORESCP@...`` and by DCMTK's ``storescu +sd`` (one
   association), same folder, same run, ``--rounds`` times in turn (medians). storescu
   runs with Debian's default (Nagle on) and with ``TCP_NODELAY=1``; storescp always
   with ``TCP_NODELAY=1``. Wall and CPU seconds (user + system of the process) each.
   With ``--baselines``, two more over one association without the engine: pynetdicom's
   own ``send_c_store`` of each file read with pydicom, and migrator's C-STORE on one
   ``link.Link`` as the target opens it, which tell the layers' costs apart.
2. Retrieval from an Orthanc's DICOM port holding the N instances: migrator's DIMSE
   source (C-FIND listing, then a fetch per row, ``-c`` at once: C-GET by series)
   against the way orthanc-tools' PacsMigrator works (C-FIND of the studies, then one
   C-MOVE per study to a storage SCP, study after study), written here with pynetdicom.
   Both keep every received instance in memory and check that all N arrived.

    .venv/bin/python bench/dimse_bench.py [--instances 2000] [--size 32] [-c 32]
        [--rounds 1] [--store-only] [--baselines] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import machine_facts, migrator_cmd, print_table, work_folder, write_results
from pynetdicom import _config, dimse_messages

from migrator.config import Settings
from migrator.ends.dimse.peer import parse_dicom_url
from migrator.ends.dimse.source import DimseSource
from migrator.testkit import OrthancProcess, upload_all
from migrator.testkit.fastgen import fast_dataset, iter_fast_dataset
from migrator.testkit.orthanc import free_port, wait_port

NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def _storescp(folder: Path, fork: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["storescp", "-aet", "STORESCP", "+xa", "--ignore", str(port)]
    if fork:
        cmd.insert(1, "--fork")
    proc = subprocess.Popen(cmd, cwd=folder, env=NODELAY, stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run `cmd`: its wall seconds and CPU seconds (user + system)."""
    cpu = _children_cpu()
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, _children_cpu() - cpu


def bare_pynetdicom(files: Path, port: int) -> tuple[float, int]:
    """pynetdicom as it comes (Nagle off, as migrator has it): one association,
    `send_c_store` of each file (dcmread). Its reactor sometimes takes a response off the
    queue before `send_c_store` does (the race `wire.pause_reactor` avoids): the store
    then ends without status after the DIMSE timeout (2 s here), and is sent again on a
    new association. Returns the seconds and the number of such lost responses."""
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts, evt

    from migrator.ends.dimse.peer import no_delay

    paths = sorted(files.iterdir())
    began = time.monotonic()
    ae = AE("BARE")
    ae.dimse_timeout = 2
    ae.requested_contexts = StoragePresentationContexts

    def associate() -> Any:
        handlers = [(evt.EVT_CONN_OPEN, no_delay)]
        return ae.associate("127.0.0.1", port, ae_title="STORESCP", evt_handlers=handlers)

    assoc = associate()
    lost = 0
    for path in paths:
        while True:
            status = assoc.send_c_store(dcmread(path))
            if "Status" in status:
                assert status.Status == 0, status
                break
            lost += 1
            if assoc.is_established:
                assoc.abort()
            assoc = associate()
    assoc.release()
    return time.monotonic() - began, lost


def bare_link(files: Path, port: int) -> tuple[float, float]:
    """migrator's C-STORE without the engine: one association opened as the target opens
    them (`link.Link`), each file read whole and stored. Wall and CPU seconds."""
    from migrator.ends.dimse.target import DimseTarget

    paths = sorted(files.iterdir())
    peer = parse_dicom_url(f"dicom://STORESCP@127.0.0.1:{port}", "target", "MIGRATOR")
    target = DimseTarget(peer, Settings(concurrency=1))

    async def run() -> None:
        for path in paths:
            await target.store(path.read_bytes())
        await target.aclose()

    cpu = time.process_time()
    began = time.monotonic()
    asyncio.run(run())
    return time.monotonic() - began, time.process_time() - cpu


def _row(copy: str, n: int, runs: list[tuple[float, float]]) -> dict[str, Any]:
    seconds = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    return {"copy": copy, "seconds": seconds, "cpu": cpu, "per_s": n / seconds,
            "rounds": [list(r) for r in runs]}  # fmt: skip


def bench_store(
    work: Path,
    files: Path,
    n: int,
    concurrency: int,
    rounds: int,
    baselines: bool,
    compare: Path | None = None,
) -> list[dict[str, Any]]:
    """C-STORE of the folder by migrator and by storescu, to one storescp, in turns (and
    by the migrator checked out in `compare`, when given)."""
    out = []
    older = {**os.environ, "PYTHONPATH": str(compare)} if compare else None
    for fork in (True, False):
        proc, port = _storescp(work / f"scp-{fork}", fork)
        label = "storescp --fork" if fork else "storescp (one association at a time)"
        ours: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        theirs_nd: list[tuple[float, float]] = []
        before: list[tuple[float, float]] = []
        try:
            url = f"dicom://STORESCP@127.0.0.1:{port}"
            scu = ["storescu", "-aec", "STORESCP", "+sd", "127.0.0.1", str(port), str(files)]
            for i in range(rounds):
                ledger = f"sqlite:///{work / f'store-{fork}-{i}.db'}"
                cmd = [*migrator_cmd(), "import", str(files), url, "--ledger", ledger,
                       "--progress", "none", "-c", str(concurrency)]  # fmt: skip
                if older is not None:
                    old = [*cmd[:-5], f"sqlite:///{work / f'old-{fork}-{i}.db'}", *cmd[-4:]]
                    before.append(_timed(old, older))
                ours.append(_timed(cmd))
                theirs.append(_timed(scu))
                theirs_nd.append(_timed(scu, NODELAY))
            rows = [_row(f"migrator ({compare}) import -> {label}", n, before)] if before else []
            rows += [
                _row(f"migrator import -> {label}", n, ours),
                _row(f"storescu -> {label}", n, theirs),
                _row(f"storescu TCP_NODELAY=1 -> {label}", n, theirs_nd),
            ]
            if baselines:
                bare, lost = bare_pynetdicom(files, port)
                copy = f"pynetdicom send_c_store, one association ({lost} lost) -> {label}"
                rows.append(_row(copy, n, [(bare, float("nan"))]))
                copy = f"migrator link.Link, one association -> {label}"
                rows.append(_row(copy, n, [bare_link(files, port)]))
        finally:
            proc.terminate()
            proc.wait(10)
        out += rows
        _print(out)
    return out


def _print(rows: list[dict[str, Any]]) -> None:
    print_table(
        ["copy", "seconds", "CPU s", "instances/s"],
        [[r["copy"], r["seconds"], r.get("cpu", float("nan")), r["per_s"]] for r in rows],
    )


async def ours_get(pacs: OrthancProcess, n: int, concurrency: int) -> float:
    """migrator's DIMSE source: listing, then C-GET of every row, `concurrency` at once."""
    settings = Settings(concurrency=concurrency)
    peer = parse_dicom_url(f"dicom://PACS@127.0.0.1:{pacs.dicom_port}", "source", "MIGRATOR")
    source = DimseSource(peer, settings)
    began = time.monotonic()
    await source.preflight()
    rows: list[dict[str, Any]] = []
    async for page in source.listing(None):
        rows.extend(page.rows)
    gate = asyncio.Semaphore(concurrency)

    class Row:
        def __init__(self, key: str) -> None:
            self.source_key, self.path, self.size, self.md5, self.orthanc_id = (
                key, None, None, None, None,
            )  # fmt: skip

    async def one(key: str) -> int:
        async with gate:
            return len(await source.fetch(Row(key)))

    sizes = await asyncio.gather(*(one(r["source_key"]) for r in rows))
    seconds = time.monotonic() - began
    await source.aclose()
    assert len(rows) == n and all(sizes), (len(rows), n)
    return seconds


def pacs_migrator_move(pacs: OrthancProcess, n: int) -> float:
    """PacsMigrator's way: C-FIND the studies, then C-MOVE each study to a storage SCP."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
    )

    received: dict[str, bytes] = {}
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        with lock:
            received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset()
        return 0

    scp = AE("MOVESCP")
    scp.supported_contexts = AllStoragePresentationContexts
    server = scp.start_server(
        ("127.0.0.1", pacs.extra["DicomModalities"]["bench"][2]),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        began = time.monotonic()
        ae = AE("MOVESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title="PACS")
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        studies = [
            str(ident.StudyInstanceUID)
            for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status in (0xFF00, 0xFF01) and ident is not None
        ]
        for uid in studies:
            m = Dataset()
            m.QueryRetrieveLevel = "STUDY"
            m.StudyInstanceUID = uid
            for _ in assoc.send_c_move(m, "MOVESCP", StudyRootQueryRetrieveInformationModelMove):
                pass
        assoc.release()
        seconds = time.monotonic() - began
    finally:
        server.shutdown()
    assert len(received) == n, (len(received), n)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32, help="pixels per side (8-bit)")
    parser.add_argument("--rounds", type=int, default=1, help="C-STORE rounds, in turns")
    parser.add_argument(
        "--compare", type=Path, help="also the migrator package found in this folder (a copy)"
    )
    parser.add_argument(
        "--baselines", action="store_true", help="also pynetdicom and one Link in-process"
    )
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--store-only", action="store_true", help="the C-STORE rounds only")
    args = parser.parse_args()
    n = args.instances
    os.environ["TCP_NODELAY"] = "1"  # the Orthanc started below: Nagle off on its side
    doc: dict[str, Any] = {
        "machine": machine_facts(),
        "instances": n,
        "size": args.size,
        "rounds": [],
    }
    with work_folder("dimse-bench-", keep=args.keep) as work:
        files = work / "files"
        files.mkdir()
        for i, inst in enumerate(iter_fast_dataset(n, seed=12, size=args.size)):
            (files / f"{i:05d}.dcm").write_bytes(inst.data)
        doc["bytes"] = sum(p.stat().st_size for p in files.iterdir())
        print(f"{n} files, {doc['bytes'] / n / 1024:.1f} KiB each")
        doc["rounds"] += bench_store(
            work, files, n, args.concurrency, max(1, args.rounds), args.baselines, args.compare
        )
        if args.store_only:
            write_results("dimse", doc)
            return
        data = fast_dataset(n, seed=12, size=args.size)
        move_port = free_port()
        pacs = OrthancProcess(
            work / "pacs",
            name="pacs",
            extra={
                "DicomAet": "PACS",
                "DicomAlwaysAllowFind": True,
                "DicomAlwaysAllowGet": True,
                "DicomAlwaysAllowMove": True,
                "DicomModalities": {"bench": ["MOVESCP", "127.0.0.1", move_port]},
            },
        ).start()
        try:
            upload_all(pacs, data)
            ours = asyncio.run(ours_get(pacs, n, args.concurrency))
            # pynetdicom as it comes for the PacsMigrator-style SCP below: migrator's source
            # turned off its standard logging handlers and made its dataset buffers spill.
            _config.LOG_HANDLER_LEVEL = "standard"
            dimse_messages.BytesIO = io.BytesIO
            theirs = pacs_migrator_move(pacs, n)
        finally:
            pacs.stop()
        doc["rounds"] += [
            {"copy": f"migrator C-FIND + C-GET by series (-c {args.concurrency})",
             "seconds": ours, "per_s": n / ours},
            {"copy": "PacsMigrator-style C-FIND + C-MOVE per study", "seconds": theirs,
             "per_s": n / theirs},
        ]  # fmt: skip
    _print(doc["rounds"])
    write_results("dimse", doc)


if __name__ == "__main__":
    main()
