"""Large-instance benchmark: one big instance replicated (and imported from a folder) by
`migrator`, against `curl` GET + `curl` POST of the same file; time and peak RSS.

    .venv/bin/python bench/large_bench.py [--sizes 600M,2G] [--rounds 3]

Goals (streamed transfers): a ~600 MB instance replicates within 1.2x the time of curl
GET then curl POST of the same file, with a peak RSS under 200 MB; a 2 GB one too, RSS
the same; the folder import of a large plain file and of an Orthanc-compressed storage
file likewise (against curl POST of the file alone, which is all an import has to do
besides reading).

Per size: a source Orthanc holds the instance (plain storage); an Orthanc with
StorageCompression stores it too and is stopped (its storage folder is the compressed
import source). Each round, in turn: curl GET + curl POST, `migrator replicate`, curl
POST of the file, `migrator import` of the file's folder, `migrator import` of the
compressed storage; the target's copy is deleted after each, so every store is new.
Times are whole processes (the migrator's include its interpreter start, ~0.5 s); peak
RSS is the process's VmHWM. Medians over rounds, with min-max.

With ``--ends``, the other ends too, each against what a plain tool does with the same
file: `migrator import` of the file into DCMTK's ``storescp`` (C-STORE) against
``storescu``; into the target by STOW-RS (Orthanc's DICOMweb plugin) against curl POST of
the file; and `migrator replicate` from the source by WADO-RS against curl GET of the
same WADO-RS answer + curl POST of the file; and `migrator replicate` from the source's
DICOM port by C-GET against DCMTK's ``getscu`` of the instance into a folder + curl POST
of the file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    Child,
    machine_facts,
    migrator_cmd,
    print_facts,
    print_table,
    wait_quiet,
    work_folder,
    write_results,
)

from migrator.ends.dicomid import orthanc_instance_id
from migrator.ends.dimse.pdu import read_meta
from migrator.testkit.dicomgen import make_instance
from migrator.testkit.orthanc import OrthancProcess, free_port, wait_port

MARK = 4096  # size of the placeholder private element that the big one replaces
DICOMWEB = {
    "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
}
# The source's DICOM port, for the C-GET runs of `--ends`.
SOURCE_AET = "SOURCE"
DIMSE_SOURCE = {"DicomAet": SOURCE_AET, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}
# DCMTK keeps Nagle's algorithm on unless told otherwise (40 ms per DIMSE message).
NODELAY = {"TCP_NODELAY": "1"}


def parse_size(text: str) -> int:
    """600M, 2G (decimal units, as the goals state them) or a number of bytes."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    text = text.strip().upper()
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def write_large_instance(path: Path, size: int, seed: int) -> tuple[str, str, tuple[str, ...]]:
    """Write a valid Part-10 file of about `size` bytes without holding it in memory: a
    small instance whose private OB element is replaced by `size` random bytes. Returns
    the Orthanc ID, the file's MD5 and its patient, study, series and SOP UIDs."""
    ids = (f"LARGE{seed}", f"1.2.3.888.{seed}", f"1.2.3.888.{seed}.1", f"1.2.3.888.{seed}.1.1")
    small = make_instance(*ids, extra_bytes=MARK, seed=seed)
    # Explicit VR little endian: (0009,1001) OB, two reserved bytes, 32-bit length.
    head = b"\x09\x00\x01\x10OB\x00\x00" + struct.pack("<I", MARK)
    at = small.index(head)
    before, after = small[:at], small[at + len(head) + MARK :]
    digest = hashlib.md5()
    rng = np.random.default_rng(seed)
    size += size & 1  # DICOM values have even lengths
    with open(path, "wb") as out:
        for part in (before, b"\x09\x00\x01\x10OB\x00\x00" + struct.pack("<I", size)):
            out.write(part)
            digest.update(part)
        left = size
        while left:
            block = rng.bytes(min(left, 16 << 20))
            out.write(block)
            digest.update(block)
            left -= len(block)
        out.write(after)
        digest.update(after)
    return orthanc_instance_id(*ids), digest.hexdigest(), ids


def curl(*args: str, out: str = "/dev/null") -> float:
    """Run curl; its wall time (it fails the benchmark on an HTTP error)."""
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "--fail", "-o", out, *args], check=True)
    return time.monotonic() - started


def curl_post(url: str, path: Path) -> float:
    """POST a file as curl streams it (-T reads the file as it sends, no Expect wait)."""
    return curl("-X", "POST", "-T", str(path), "-H", "Content-Type: application/dicom",
                "-H", "Expect:", f"{url.rstrip('/')}/instances")  # fmt: skip


def run_migrator(args: list[str], log: Path) -> tuple[float, float, float]:
    """One migrator process: (wall seconds, peak RSS in MB, CPU seconds)."""
    child = Child.start([*migrator_cmd(), *args], log, env={"MIGRATOR_PROGRESS": "none"})
    code = child.finish(timeout=3600)
    if code != 0:
        raise SystemExit(f"migrator {args[0]} exited {code}:\n{child.log_tail()}")
    assert child.ended is not None and child.max_rss_mb is not None
    return child.ended - child.started, child.max_rss_mb, child.cpu_seconds or 0.0


def check_and_clear(target: OrthancProcess, orthanc_id: str, md5: str) -> None:
    """The target holds the instance byte-identical; then it is deleted for the next."""
    assert target.md5(orthanc_id) == md5, "target's copy differs"
    target.delete_instance(orthanc_id)


def storescu(port: int, path: Path) -> float:
    """DCMTK's storescu sending the file to our storescp; its wall time."""
    started = time.monotonic()
    cmd = ["storescu", "-aec", "STORESCP", "127.0.0.1", str(port), str(path)]
    subprocess.run(cmd, check=True, env={**os.environ, **NODELAY})
    return time.monotonic() - started


def other_ends(
    runs: dict[str, list[Any]],
    r: int,
    work: Path,
    folder: Path,
    source: OrthancProcess,
    target: OrthancProcess,
    port: int,
    ids: tuple[str, ...],
    check: Callable[[], None],
) -> None:
    """One round of `--ends`: C-STORE, STOW-RS and WADO-RS, each beside its plain tool."""

    def migrator(what: str, name: str, *args: str) -> None:
        ledger = f"sqlite:///{work}/{name}-{r}.db"
        runs.setdefault(what, []).append(
            run_migrator([*args, "--ledger", ledger], work / f"{name}-{r}.log")
        )

    big = next(folder.iterdir())
    runs.setdefault("storescu -> storescp", []).append((storescu(port, big), None, None))
    dimse = f"dicom://STORESCP@127.0.0.1:{port}"
    migrator("migrator import -> storescp", "import-dimse", "import", str(folder), dimse)
    stow = f"dicomweb+{target.url}dicom-web"
    migrator("migrator import -> STOW-RS", "import-stow", "import", str(folder), stow)
    check()
    # What the source's WADO-RS answer alone takes (Orthanc's plugin builds it whole).
    wado = f"{source.url}dicom-web/studies/{ids[1]}/series/{ids[2]}/instances/{ids[3]}"
    accept = 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'
    runs.setdefault("  curl GET (WADO-RS)", []).append((curl("-H", accept, wado), None, None))
    web = f"dicomweb+{source.url}dicom-web"
    migrator("migrator replicate WADO-RS ->", "replicate-wado", "replicate", web, target.url)
    check()
    runs.setdefault("  getscu (C-GET)", []).append((getscu(source, ids, work), None, None))
    peer = f"dicom://{SOURCE_AET}@127.0.0.1:{source.dicom_port}"
    migrator("migrator replicate C-GET ->", "replicate-cget", "replicate", peer, target.url)
    # The peer sends the dataset behind a file meta of its own: the dataset must match.
    copy, stored = work / "cget.dcm", orthanc_instance_id(*ids)
    curl(f"{target.url}instances/{stored}/file", out=str(copy))
    assert dataset_md5(copy) == dataset_md5(big), "the C-GET copy's dataset differs"
    copy.unlink()
    target.delete_instance(stored)


def dataset_md5(path: Path) -> str:
    """MD5 of a Part-10 file's dataset (what follows its file meta), read in blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
        meta = read_meta(head)
        assert meta is not None, f"{path} is not a Part-10 file"
        digest.update(head[meta.offset :])
        while block := fh.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def getscu(source: OrthancProcess, ids: tuple[str, ...], work: Path) -> float:
    """DCMTK's getscu retrieving the instance from the source's DICOM port into a
    folder (study root, IMAGE level); its wall time. The folder is emptied after."""
    out = work / "getscu"
    out.mkdir(exist_ok=True)
    keys = {"0008,0052": "IMAGE", "0020,000D": ids[1], "0020,000E": ids[2], "0008,0018": ids[3]}
    cmd = ["getscu", "-S", "-aec", SOURCE_AET, "-od", str(out), "127.0.0.1", str(source.dicom_port)]
    cmd += [arg for key, value in keys.items() for arg in ("-k", f"{key}={value}")]
    started = time.monotonic()
    subprocess.run(cmd, check=True, env={**os.environ, **NODELAY})
    seconds = time.monotonic() - started
    got = list(out.iterdir())
    assert len(got) == 1, f"getscu brought {len(got)} files"
    got[0].unlink()
    return seconds


def one_size(size: int, rounds: int, work: Path, ends: bool = False) -> dict[str, Any]:
    """Every measurement for one instance size."""
    folder = work / "files"
    folder.mkdir()
    big = folder / "large.dcm"
    started = time.monotonic()
    orthanc_id, md5, ids = write_large_instance(big, size, seed=size % 997)
    print(f"{big.stat().st_size / 1e6:.0f} MB file written in {time.monotonic() - started:.1f} s")
    web = {"extra": {**DICOMWEB, **DIMSE_SOURCE}} if ends else {}
    servers = {
        name: OrthancProcess(work / name, name=name, **kwargs)
        for name, kwargs in (
            ("source", web),
            ("target", web),
            ("compressed", {"extra": {"StorageCompression": True}}),
        )
    }
    for name, server in servers.items():
        (work / name).mkdir()
        server.start()
    source, target, compressed = servers["source"], servers["target"], servers["compressed"]
    scp = None
    if ends:
        port = free_port()
        scp = subprocess.Popen(
            ["storescp", "--fork", "-aet", "STORESCP", "+xa", "--ignore", str(port)],
            env={**os.environ, **NODELAY},
            stdout=subprocess.DEVNULL,
        )
        wait_port(port)
    try:
        curl_post(source.url, big)
        curl_post(compressed.url, big)
        compressed.stop()
        runs: dict[str, list[tuple[float, float | None, float | None]]] = {}
        download = work / "download.dcm"
        for r in range(rounds):
            background = wait_quiet()
            print(f"round {r + 1}/{rounds} (machine {background:.0%} busy before)")
            get = curl(f"{source.url}instances/{orthanc_id}/file", out=str(download))
            post = curl_post(target.url, download)
            download.unlink()
            runs.setdefault("curl GET + curl POST", []).append((get + post, None, None))
            runs.setdefault("  of which curl GET", []).append((get, None, None))
            check_and_clear(target, orthanc_id, md5)
            ledger = f"sqlite:///{work}/replicate-{r}.db"
            runs.setdefault("migrator replicate", []).append(
                run_migrator(
                    ["replicate", source.url, target.url, "--ledger", ledger],
                    work / f"replicate-{r}.log",
                )
            )
            check_and_clear(target, orthanc_id, md5)
            runs.setdefault("curl POST of the file", []).append(
                (curl_post(target.url, big), None, None)
            )
            check_and_clear(target, orthanc_id, md5)
            for kind, where in (
                ("plain file", folder),
                ("compressed storage", compressed.storage_dir),
            ):
                name = f"import-{kind.split()[0]}-{r}"
                runs.setdefault(f"migrator import ({kind})", []).append(
                    run_migrator(
                        [
                            "import",
                            str(where),
                            target.url,
                            "--ledger",
                            f"sqlite:///{work}/{name}.db",
                        ],
                        work / f"{name}.log",
                    )
                )
                check_and_clear(target, orthanc_id, md5)
            if ends:
                other_ends(
                    runs, r, work, folder, source, target, port, ids,
                    lambda: check_and_clear(target, orthanc_id, md5),
                )  # fmt: skip
    finally:
        if scp is not None:
            scp.terminate()
            scp.wait(10)
        for server in servers.values():
            server.stop(graceful=False)
    return {"size": big.stat().st_size, "rounds": rounds, "runs": runs}


def summarize(result: dict[str, Any]) -> list[list[Any]]:
    """Table rows: what, median seconds (min-max), x curl, MB/s, peak RSS, CPU."""
    rows = []
    base = statistics.median(run[0] for run in result["runs"]["curl GET + curl POST"])
    post = statistics.median(run[0] for run in result["runs"]["curl POST of the file"])
    scu = result["runs"].get("storescu -> storescp")
    dimse = statistics.median(run[0] for run in scu) if scu else None
    for what, runs in result["runs"].items():
        times = [run[0] for run in runs]
        median = statistics.median(times)
        rss = [run[1] for run in runs if run[1] is not None]
        cpu = [run[2] for run in runs if run[2] is not None]
        ref = post if "import" in what else base
        if "storescp" in what and dimse:
            ref = dimse
        for leg, get in (("WADO-RS ->", "  curl GET (WADO-RS)"), ("C-GET ->", "  getscu (C-GET)")):
            if leg in what and get in result["runs"]:
                ref = statistics.median(run[0] for run in result["runs"][get]) + post
        rows.append([
            f"{result['size'] / 1e6:.0f} MB",
            what,
            f"{median:.2f} ({min(times):.2f}-{max(times):.2f})",
            f"{median / ref:.2f}x" if what.startswith("migrator") else "",
            f"{result['size'] / median / 1e6:.0f}",
            f"{max(rss):.0f}" if rss else "",
            f"{statistics.median(cpu):.1f}" if cpu else "",
        ])  # fmt: skip
    return rows


def main() -> None:
    """Parse arguments, measure every size, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="600M,2G", help="instance sizes, e.g. 600M,2G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ends", action="store_true", help="DIMSE and DICOMweb ends too")
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    results = []
    for text in args.sizes.split(","):
        with work_folder("large-bench-") as work:
            results.append(one_size(parse_size(text), args.rounds, work, args.ends))
        head = [
            "size",
            "what",
            "seconds median (min-max)",
            "vs curl (storescu)",
            "MB/s",
            "peak RSS MB",
            "CPU s",
        ]
        print_table(head, [row for r in results for row in summarize(r)])
    write_results("large", {"facts": facts, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
