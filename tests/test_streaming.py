"""Streamed transfers: an instance larger than the memory budget goes from a real Orthanc
(or a file, plain or stored compressed by Orthanc) to a real Orthanc without being held
in memory, byte-identical; a source cut mid-body never leaves it `sent`.

The CLI runs as a subprocess whose own peak RSS is read from `wait4`: it must stay well
under the instance's size (fetched whole, the instance alone would be held two to three
times over).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CliResult, dcmtk, ledger_rows, state_counts
from faultkit import md5_of, write_config
from test_dicomweb import DICOMWEB, dw
from test_dimse import PACS_AET, _pacs

from migrator.config import Settings
from migrator.ends import spool
from migrator.ends.dicomid import orthanc_instance_id
from migrator.ends.dimse import scp
from migrator.ends.dimse.pdu import read_meta
from migrator.ends.dimse.peer import parse_dicom_url
from migrator.ends.dimse.scp import SPILL_ABOVE
from migrator.ends.dimse.source import DimseSource
from migrator.testkit.dicomgen import SyntheticInstance, make_instance
from migrator.testkit.faults import TruncateResponse
from migrator.testkit.orthanc import OrthancProcess, free_port
from migrator.testkit.proxy import Proxy

# Larger than the memory budget of these runs (4 MiB) and than the streaming threshold.
BIG = 40_000_000
MiB = 1 << 20


def big_instance(seed: int = 1) -> SyntheticInstance:
    """One ~40 MB instance of incompressible data."""
    ids = (f"BIG{seed}", f"1.2.3.777.{seed}", f"1.2.3.777.{seed}.1", f"1.2.3.777.{seed}.1.1")
    data = make_instance(*ids, extra_bytes=BIG, seed=seed)
    return SyntheticInstance(orthanc_instance_id(*ids), *ids, data=data)


# Runs the CLI and, at its exit, writes its own peak RSS (kB) to the file named by
# MIGRATOR_TEST_HWM. The parent cannot measure it: `wait4`'s ru_maxrss of a child also
# counts the image it was forked from (this test process, which holds the instance).
_MEASURED = """
import atexit, os, sys
def report():
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["MIGRATOR_TEST_HWM"], "w") as out:
        out.write(peak)
atexit.register(report)
sys.argv[0] = "migrator"
from migrator.__main__ import main
main()
"""


def run_measured(*args: str, timeout: float = 300) -> tuple[CliResult, int]:
    """Run `migrator ARGS` in a subprocess; its result and its own peak RSS in bytes."""
    with tempfile.TemporaryDirectory() as folder:
        hwm = Path(folder) / "hwm"
        env = {**os.environ, "MIGRATOR_PROGRESS": "none", "MIGRATOR_TEST_HWM": str(hwm)}
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURED, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        peak = int(hwm.read_text()) * 1024
    return CliResult(proc.returncode, proc.stdout, proc.stderr), peak


def small_budget(tmp_path: Path) -> Path:
    """A config whose memory budget (4 MiB) is far below the instance's size."""
    return write_config(tmp_path / "migrator.toml", throttle={"max_memory": "4Mi"})


def assert_streamed(peak: int, size: int) -> None:
    """Peak RSS well under the instance: the interpreter and its modules take ~75 MiB,
    a streamed transfer a few MiB more; a whole one would add 2-3 times `size`."""
    assert peak < 80 * MiB + size // 2, f"peak RSS {peak / MiB:.0f} MiB for {size / MiB:.0f} MiB"


def assert_on_target(target: OrthancProcess, inst: SyntheticInstance) -> None:
    """The target holds the instance, byte-identical (its MD5, as Orthanc computed it)."""
    assert inst.orthanc_id in target.instance_ids()
    assert target.md5(inst.orthanc_id) == md5_of(inst.data)


@pytest.mark.parametrize("source_md5", [True, False], ids=["source-md5", "no-source-md5"])
def test_streamed_replicate_of_an_instance_larger_than_the_budget(
    source_md5: bool,
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    """The MD5 recorded is the one the source stored, or, when it keeps none
    (StoreMD5ForAttachments off), the one computed on the way."""
    source = orthanc_factory("source", extra={"StoreMD5ForAttachments": source_md5})
    target = orthanc_factory("target")
    inst = big_instance()
    source.upload(inst.data)
    result, peak = run_measured(
        "replicate", source.url, target.url, "--ledger", f"sqlite:///{ledger_path}",
        "--config", str(small_budget(tmp_path)),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert state_counts(ledger_path) == {"sent": 1}
    [(size, md5)] = ledger_rows(ledger_path, "SELECT size, md5 FROM instances")
    assert (size, md5) == (len(inst.data), md5_of(inst.data))
    assert_on_target(target, inst)
    assert_streamed(peak, len(inst.data))


def test_instance_of_unknown_size_is_streamed_by_its_announced_length(
    source_target: tuple[OrthancProcess, OrthancProcess], tmp_path: Path, ledger_path: Path
) -> None:
    """Rows listed from the change log carry no size: the download's Content-Length
    decides, and a large one is streamed all the same."""
    source, target = source_target
    inst = big_instance(7)
    source.upload(inst.data)
    args = ("--ledger", f"sqlite:///{ledger_path}", "--config", str(small_budget(tmp_path)))
    result, _ = run_measured("replicate", source.url, target.url, "--dry-run", *args)
    assert result.code == 0, result.stderr
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("UPDATE instances SET size = NULL")
    result, peak = run_measured("replicate", source.url, target.url, *args)
    assert result.code == 0, result.stderr
    assert ledger_rows(ledger_path, "SELECT state, size FROM instances") == [
        ("sent", len(inst.data))
    ]
    assert_on_target(target, inst)
    assert_streamed(peak, len(inst.data))


def _big_file(tmp_path: Path, seed: int) -> tuple[Path, SyntheticInstance]:
    """A folder holding one large instance's file."""
    inst = big_instance(seed)
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "big.dcm").write_bytes(inst.data)
    return folder, inst


def _folder_import(
    folder: Path, tmp_path: Path, ledger_path: Path, target: OrthancProcess | str
) -> tuple[CliResult, int]:
    """`migrator import FOLDER TARGET` under a small memory budget; TARGET an Orthanc
    (its REST URL) or any target URL."""
    url = target if isinstance(target, str) else target.url
    return run_measured(
        "import", str(folder), url, "--ledger", f"sqlite:///{ledger_path}",
        "--config", str(small_budget(tmp_path)),
    )  # fmt: skip


def test_streamed_import_of_a_large_plain_file(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_path: Path
) -> None:
    folder, inst = _big_file(tmp_path, 2)
    target = orthanc_factory("target")
    result, peak = _folder_import(folder, tmp_path, ledger_path, target)
    assert result.code == 0, result.stderr
    assert state_counts(ledger_path) == {"sent": 1}
    assert_on_target(target, inst)
    assert_streamed(peak, len(inst.data))
    # Hashed on the way, beside the reading, the recorded MD5 is the whole file's.
    with sqlite3.connect(ledger_path) as db:
        assert db.execute("SELECT md5 FROM instances").fetchall() == [(md5_of(inst.data),)]


def _storage(
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    seeds: list[int],
    compressed: bool,
) -> tuple[Path, list[SyntheticInstance], list[Path]]:
    """An Orthanc storage folder (with its index) holding large instances, stored with
    or without StorageCompression, the Orthanc stopped; their DICOM files in it."""
    old = orthanc_factory("old", extra={"StorageCompression": compressed})
    instances = [big_instance(seed) for seed in seeds]
    uuids = []
    for inst in instances:
        old.upload(inst.data)
        info = old.client().get(f"/instances/{inst.orthanc_id}/attachments/dicom/info")
        uuids.append(info.json()["Uuid"])
    old.stop()
    storage = Path(shutil.copytree(old.storage_dir, tmp_path / "storage"))
    return storage, instances, [storage / u[:2] / u[2:4] / u for u in uuids]


@pytest.fixture
def compressed_storage(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path
) -> tuple[Path, SyntheticInstance]:
    """A storage folder whose large instance Orthanc stored compressed."""
    storage, [inst], [stored] = _storage(orthanc_factory, tmp_path, [3], compressed=True)
    assert stored.read_bytes()[8:9] == b"\x78"  # the size prefix, then a zlib stream
    return storage, inst


def test_streamed_import_of_a_large_compressed_storage_file(
    compressed_storage: tuple[Path, SyntheticInstance],
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    storage, inst = compressed_storage
    target = orthanc_factory("target")
    result, peak = _folder_import(storage, tmp_path, ledger_path, target)
    assert result.code == 0, result.stderr
    # The index's MD5 was checked on the way (the row records it).
    assert ledger_rows(ledger_path, "SELECT state, md5 FROM instances") == [
        ("sent", md5_of(inst.data))
    ]
    assert_on_target(target, inst)
    assert_streamed(peak, len(inst.data))


def _flip_a_byte(path: Path) -> None:
    """Bit rot in the middle of a file: inside the random private data of the instance,
    so that the file is still DICOM that Orthanc would store, with other content."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_corrupt_storage_file_is_rejected_and_never_stored(
    compressed: bool,
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    """A storage file that changed on disk: its MD5 (and, compressed, its zlib check
    value) tells only at the end, after nearly all of it went to the target. The last
    chunk is held back until then, so the target never receives a whole, wrong file
    (the next instance keeps the run, and the connections, going meanwhile)."""
    storage, [bad, good], [stored, _] = _storage(
        orthanc_factory, tmp_path, [5, 6], compressed=compressed
    )
    _flip_a_byte(stored)
    target = orthanc_factory("target")
    result, _ = _folder_import(storage, tmp_path, ledger_path, target)
    assert result.code != 0
    rows = dict(ledger_rows(ledger_path, "SELECT orthanc_id, state FROM instances"))
    assert rows == {bad.orthanc_id: "rejected", good.orthanc_id: "sent"}
    [error] = ledger_rows(ledger_path, "SELECT last_error FROM instances WHERE state = 'rejected'")
    assert "corrupt" in error[0]
    assert target.instance_ids() == [good.orthanc_id]


def test_source_cut_mid_body_is_never_sent(
    source_target: tuple[OrthancProcess, OrthancProcess], tmp_path: Path, ledger_path: Path
) -> None:
    """Every download of the file is cut after 10 MB: the transfer fails (retried, then
    `failed`), the target never stores a partial file; with the fault gone, a retry
    sends it whole."""
    source, target = source_target
    inst = big_instance(4)
    source.upload(inst.data)
    config = tmp_path / "migrator.toml"
    config.write_text(
        "[retry]\nmax_attempts = 2\nbackoff_initial = 0.05\nbackoff_max = 0.1\n"
        '[throttle]\nmax_memory = "4Mi"\n'
    )
    with Proxy("127.0.0.1", source.http_port) as proxy:
        proxy.set_faults(
            lambda method, path, _: (
                TruncateResponse(10_000_000) if method == "GET" and path.endswith("/file") else None
            )
        )
        args = ("--ledger", f"sqlite:///{ledger_path}", "--config", str(config))
        result, peak = run_measured("replicate", proxy.url, target.url, *args)
        assert proxy.fault_counts()["truncate_response"] == 2
        assert result.code != 0
        [(state, error)] = ledger_rows(ledger_path, "SELECT state, last_error FROM instances")
        assert state == "failed", error
        assert target.count() == 0
        assert_streamed(peak, len(inst.data))
        # The source whole again: the failed row is sent, byte-identical.
        proxy.set_faults(None)
        result, _ = run_measured("retry", "--state", "failed", *args)
        assert result.code == 0, result.stderr
        result, _ = run_measured("replicate", proxy.url, target.url, *args)
        assert result.code == 0, result.stderr
    assert state_counts(ledger_path) == {"sent": 1}
    assert_on_target(target, inst)


def _storescp(port: int, folder: Path) -> AbstractContextManager[None]:
    """DCMTK's storescp writing what it receives into `folder` bit for bit (``+B``)."""
    folder.mkdir(exist_ok=True)
    return dcmtk(port, "storescp", "-aet", "STORESCP", "+xa", "+B", "-od", str(folder), str(port))


def _dataset(data: bytes) -> bytes:
    """A Part-10 file's dataset: what follows its file meta."""
    meta = read_meta(data)
    assert meta is not None
    return data[meta.offset :]


def test_streamed_c_store_of_a_large_file(
    tmp_path: Path, ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than the memory budget goes to a DICOM peer chunk by chunk: the
    peer receives the same dataset, and the process never holds the file."""
    monkeypatch.setenv("TCP_NODELAY", "1")  # for storescp (see test_dimse)
    folder, inst = _big_file(tmp_path, 8)
    port, received = free_port(), tmp_path / "received"
    with _storescp(port, received):
        result, peak = _folder_import(
            folder, tmp_path, ledger_path, f"dicom://STORESCP@127.0.0.1:{port}"
        )
    assert result.code == 0, result.stderr
    # Nothing to check, and no byte proof to record: the file was not hashed.
    assert ledger_rows(ledger_path, "SELECT state, md5 FROM instances") == [("sent", None)]
    [stored] = received.iterdir()
    assert _dataset(stored.read_bytes()) == _dataset(inst.data)
    assert_streamed(peak, len(inst.data))


def test_corrupt_storage_file_never_reaches_the_dicom_peer(
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streamed by C-STORE, a storage file whose MD5 no longer matches its index is found
    out before the dataset's last fragment: the association is aborted, the peer keeps
    nothing of it, and the next instance is stored."""
    monkeypatch.setenv("TCP_NODELAY", "1")
    storage, [bad, good], [stored, _] = _storage(orthanc_factory, tmp_path, [9, 10], False)
    _flip_a_byte(stored)
    port, received = free_port(), tmp_path / "received"
    with _storescp(port, received):
        result, _ = _folder_import(
            storage, tmp_path, ledger_path, f"dicom://STORESCP@127.0.0.1:{port}"
        )
    assert result.code != 0
    rows = dict(ledger_rows(ledger_path, "SELECT orthanc_id, state FROM instances"))
    assert rows == {bad.orthanc_id: "rejected", good.orthanc_id: "sent"}
    # The index's MD5, checked on the way, is recorded.
    [(md5,)] = ledger_rows(ledger_path, "SELECT md5 FROM instances WHERE state = 'sent'")
    assert md5 == md5_of(good.data)
    [kept] = received.iterdir()
    assert _dataset(kept.read_bytes()) == _dataset(good.data)


def test_streamed_stow_of_a_large_file(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_path: Path
) -> None:
    """A file larger than the memory budget goes by STOW-RS as a multipart body of
    announced length around its chunks: stored byte-identical, never held whole."""
    folder, inst = _big_file(tmp_path, 11)
    target = orthanc_factory("target", extra=DICOMWEB)
    result, peak = _folder_import(folder, tmp_path, ledger_path, dw(target.url))
    assert result.code == 0, result.stderr
    assert ledger_rows(ledger_path, "SELECT state, md5 FROM instances") == [
        ("sent", md5_of(inst.data))
    ]
    assert_on_target(target, inst)
    assert_streamed(peak, len(inst.data))


def test_corrupt_storage_file_never_reaches_the_stow_target(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_path: Path
) -> None:
    """Streamed by STOW-RS, a storage file whose MD5 no longer matches its index ends the
    request before the body's end: the server stores nothing of it."""
    storage, [bad, good], [stored, _] = _storage(orthanc_factory, tmp_path, [12, 13], False)
    _flip_a_byte(stored)
    target = orthanc_factory("target", extra=DICOMWEB)
    result, _ = _folder_import(storage, tmp_path, ledger_path, dw(target.url))
    assert result.code != 0
    rows = dict(ledger_rows(ledger_path, "SELECT orthanc_id, state FROM instances"))
    assert rows == {bad.orthanc_id: "rejected", good.orthanc_id: "sent"}
    assert target.instance_ids() == [good.orthanc_id]


def test_streamed_wado_retrieve_of_a_large_instance(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_path: Path
) -> None:
    """From a DICOMweb source, an instance whose WADO-RS part announces more than the
    streaming threshold is handed on as it arrives: byte-identical on the target, never
    held whole (nor read with its series: a series is read whole up to a sixteenth of the
    memory budget). An answer cut short on the way is never stored, and is sent whole
    once the source answers whole again."""
    source = orthanc_factory("source", extra=DICOMWEB)
    target = orthanc_factory("target")
    inst = big_instance(14)
    data = inst.data
    source.upload(data)
    config = tmp_path / "migrator.toml"
    config.write_text(
        "[retry]\nmax_attempts = 2\nbackoff_initial = 0.05\nbackoff_max = 0.1\n"
        '[throttle]\nmax_memory = "4Mi"\n'
    )
    args = ("--ledger", f"sqlite:///{ledger_path}", "--config", str(config))
    with Proxy("127.0.0.1", source.http_port) as proxy:
        proxy.set_faults(
            lambda method, path, _: (
                TruncateResponse(20_000_000) if path.endswith(inst.sop_uid) else None
            )
        )
        result, _ = run_measured("replicate", dw(proxy.url), target.url, *args)
        assert result.code != 0
        [(state, error)] = ledger_rows(ledger_path, "SELECT state, last_error FROM instances")
        assert state == "failed" and error.startswith("source"), error
        assert target.count() == 0
        proxy.set_faults(None)
        assert run_measured("retry", "--state", "failed", *args)[0].code == 0
        result, peak = run_measured("replicate", dw(proxy.url), target.url, *args)
    assert result.code == 0, result.stderr
    assert ledger_rows(ledger_path, "SELECT state, md5 FROM instances") == [("sent", md5_of(data))]
    assert_on_target(target, inst)
    assert_streamed(peak, len(data))


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_dimse_retrieve_of_a_large_instance_is_streamed_from_its_file(
    retrieve: str,
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance a DICOM peer sends by C-GET or C-MOVE goes on in a file once past the
    spill threshold, then is streamed from a file into the target: the process holds the
    threshold's worth of it, never the whole, and no file is left behind. The same run
    with a small instance gives the process's own peak to compare with."""
    move_port = free_port()
    pacs = _pacs(orthanc_factory, move_port)
    target = orthanc_factory("target")
    config = tmp_path / "migrator.toml"
    config.write_text(
        f'[throttle]\nmax_memory = "4Mi"\n[dimse]\nretrieve = "{retrieve}"\n'
        f"move_port = {move_port}\n"
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    # What a killed run left behind: swept by the next one.
    (temp / f"{spool.SPOOL_PREFIX}{_dead_pid()}-left").mkdir()

    def replicate(name: str) -> tuple[CliResult, int]:
        ledger = tmp_path / f"{name}.db"
        return run_measured(
            "replicate", f"dicom://{PACS_AET}@127.0.0.1:{pacs.dicom_port}", target.url,
            "--ledger", f"sqlite:///{ledger}", "--config", str(config),
        )  # fmt: skip

    small = make_instance("SMALL", "1.2.3.778", "1.2.3.778.1", "1.2.3.778.1.1", seed=2)
    pacs.upload(small)
    result, base = replicate("small")
    assert result.code == 0, result.stderr
    inst = big_instance(16)
    pacs.upload(inst.data)
    result, peak = replicate("big")
    assert result.code == 0, result.stderr
    # The peer wraps the dataset in a file meta of its own; the dataset is the same.
    assert inst.orthanc_id in target.instance_ids()
    assert _dataset(target.file(inst.orthanc_id)) == _dataset(inst.data)
    # Whole, it would add two to three times its size (185-198 MiB in all).
    grown = peak - base
    assert grown < SPILL_ABOVE + len(inst.data) // 4, f"{grown / MiB:.0f} MiB over {base / MiB:.0f}"
    assert list(temp.iterdir()) == []


def test_spilling_buffer_moves_to_a_file_past_its_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scp, "SPILL_ABOVE", 10)
    buffer = scp.SpillingBuffer()
    buffer.write(b"0123")
    buffer.write(b"4567")
    assert buffer.spilled is None and buffer.getvalue() == b"01234567"
    buffer.write(b"89abcdef")  # past 10 bytes: all of it goes to a file
    assert buffer.spilled is not None and buffer.spilled_size() == 16
    assert len(bytes(buffer.getbuffer())) == 0  # nothing left in memory
    buffer.write(b"!")
    assert buffer.getvalue() == b"0123456789abcdef!"
    buffer.seek(0)
    with pytest.raises(io.UnsupportedOperation):
        buffer.read()  # a decoder would see nothing of the dataset
    spilled = buffer.spilled
    buffer.close()
    assert spilled.closed


def _dead_pid() -> int:
    """The process ID of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_spool_folders_of_killed_runs_are_swept(tmp_path: Path) -> None:
    folders = {
        who: tmp_path / f"{spool.SPOOL_PREFIX}{pid}-a1b2"
        for who, pid in (("dead", _dead_pid()), ("ours", os.getpid()), ("running", 1))
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / "0.dcm").write_bytes(b"kept")
    unnamed = tmp_path / f"{spool.SPOOL_PREFIX}x"
    unnamed.mkdir()
    assert spool.sweep_spool_folders(str(tmp_path)) == 1
    assert not folders["dead"].exists()
    assert folders["ours"].exists() and folders["running"].exists() and unnamed.exists()


@dataclass
class _Row:
    """What a source is asked for (as the ledger's lease carries it)."""

    source_key: str
    path: str | None = None
    size: int | None = None
    md5: str | None = None
    orthanc_id: str | None = None


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_series_retrieval_keeps_what_spilled_on_disk(
    retrieve: str,
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two 20 MB instances of one series, past the spill threshold and past what a series
    retrieval keeps in memory under a 4 MiB budget: the first fetch retrieves the series,
    and the second instance waits on disk for its own fetch (not retrieved again), the
    same dataset as the peer's. Nothing is left in the temporary folder."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    move_port = free_port()
    pacs = _pacs(orthanc_factory, move_port)
    ids = [("SPILL", "1.2.3.779", "1.2.3.779.1", f"1.2.3.779.1.{i}") for i in (1, 2)]
    files = [make_instance(*one, extra_bytes=20_000_000, seed=7) for one in ids]
    for data in files:
        assert len(data) > scp.SPILL_ABOVE
        pacs.upload(data)

    async def run() -> tuple[bytes, bytes | None]:
        settings = Settings(dimse_retrieve=retrieve, dimse_move_port=move_port, max_memory="4Mi")
        url = f"dicom://{PACS_AET}@127.0.0.1:{pacs.dicom_port}"
        source = DimseSource(parse_dicom_url(url, "source", "MIGRATOR"), settings)
        try:
            await source.preflight()
            keys = [r["source_key"] async for page in source.listing(None) for r in page.rows]
            first = next(k for k in keys if k.endswith(ids[0][3]))
            got = await source.fetch(_Row(first))
            waiting = source.cache.take(ids[1][2], ids[1][3])
            assert isinstance(waiting, spool.Spooled), waiting
            with open(waiting.path, "rb") as fh:
                return got, fh.read()
        finally:
            await source.aclose()

    got, waiting = asyncio.run(run())
    assert _dataset(got) == _dataset(files[0])
    assert _dataset(waiting) == _dataset(files[1])
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(("migrator-spool-", "tmp"))]
    assert leftovers == []


def test_wado_series_answer_past_the_budget_is_read_once_into_files(
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A series of two 20 MB instances from a DICOMweb source under a 4 MiB budget (a
    series read holds 256 KiB in memory): one WADO-RS request for the series, its parts
    written to files as they arrive and streamed from there, no instance retrieved again
    alone; byte-identical on the target, the process's peak never near the instances'
    size, nothing left in the temporary folder."""
    source = orthanc_factory("source", extra=DICOMWEB)
    target = orthanc_factory("target")
    ids = [("WSERIES", "1.2.3.780", "1.2.3.780.1", f"1.2.3.780.1.{i}") for i in (1, 2)]
    files = [make_instance(*one, extra_bytes=20_000_000, seed=9) for one in ids]
    for data in files:
        source.upload(data)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    with Proxy("127.0.0.1", source.http_port) as proxy:
        result, peak = run_measured(
            "replicate", dw(proxy.url), target.url, "--ledger", f"sqlite:///{ledger_path}",
            "--config", str(small_budget(tmp_path)),
        )  # fmt: skip
        paths = [p.split("?")[0].rstrip("/").split("/") for m, p in proxy.requests()]
    assert result.code == 0, result.stderr
    assert [p[-1] for p in paths if p[-2] == "series"] == [ids[0][2]]
    assert [p for p in paths if p[-2] == "instances"] == []
    assert ledger_rows(ledger_path, "SELECT state, md5 FROM instances ORDER BY sop_uid") == [
        ("sent", md5_of(data)) for data in files
    ]
    for one, data in zip(ids, files, strict=True):
        assert target.md5(orthanc_instance_id(*one)) == md5_of(data)
    assert_streamed(peak, sum(map(len, files)))
    assert list(temp.iterdir()) == []
