"""DIMSE ends against real peers: Orthanc's DICOM port (C-FIND, C-GET, C-MOVE, C-STORE
SCP) and DCMTK's storescp (a C-STORE SCP that is not an Orthanc)."""

from __future__ import annotations

import io
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import (
    CliResult,
    dcmtk,
    fill,
    ledger_rows,
    run_cli,
    start_cli,
    state_counts,
    wait_for_sent,
)
from pydicom.uid import RLELossless

from migrator.errors import Kind, verdict_for_association, verdict_for_dimse_status
from migrator.testkit import OrthancProcess, SyntheticInstance, make_dataset, upload_all
from migrator.testkit.orthanc import free_port

N = 16
PACS_AET = "PACS"


@pytest.fixture(autouse=True)
def _no_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    # Debian's DCMTK (Orthanc's DICOM stack, storescp) keeps Nagle's algorithm on unless
    # told otherwise: 40 ms per DIMSE message. The peers started here inherit this.
    monkeypatch.setenv("TCP_NODELAY", "1")


def _pacs(factory: Callable[..., OrthancProcess], move_port: int = 0, **extra: object):
    """An Orthanc serving C-FIND, C-GET and C-MOVE to anyone, knowing MIGRATOR as a move
    destination on `move_port`."""
    config = {
        "DicomAet": PACS_AET,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {"migrator": ["MIGRATOR", "127.0.0.1", move_port or 1]},
        **extra,
    }
    return factory("pacs", extra=config)


def _dicom_url(server: OrthancProcess, aet: str = PACS_AET) -> str:
    return f"dicom://{aet}@127.0.0.1:{server.dicom_port}"


def _config(tmp_path: Path, **dimse: object) -> str:
    lines = ["[dimse]"] + [
        f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}"
        for k, v in dimse.items()
    ]
    path = tmp_path / "dimse.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _same_instances(target: OrthancProcess, expected: list[SyntheticInstance]) -> None:
    """The target holds exactly these SOP Instance UIDs, each with the same pixel data."""
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in expected)
    for inst in expected:
        got = pydicom.dcmread(io.BytesIO(target.file(inst.orthanc_id)))
        want = pydicom.dcmread(io.BytesIO(inst.data))
        assert got.SOPInstanceUID == want.SOPInstanceUID
        assert got.PixelData == want.PixelData


def _files(folder: Path, instances: list[SyntheticInstance], first: bytes | None = None) -> Path:
    """The instances as files in `folder` (the first one's bytes replaced by `first`)."""
    folder.mkdir()
    for i, inst in enumerate(instances):
        (folder / f"{i}.dcm").write_bytes(first if i == 0 and first else inst.data)
    return folder


def _import_to_storescp(folder: Path, ledger_url: str, *options: str) -> CliResult:
    """`migrator import FOLDER dicom://ANY@...` into a storescp run with `options`."""
    port = free_port()
    with dcmtk(port, "storescp", *options, str(port)):
        return run_cli(
            "import", str(folder), f"dicom://ANY@127.0.0.1:{port}", "--ledger", ledger_url
        )


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp writing what it receives into a folder: (port, folder)."""
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    with dcmtk(port, "storescp", "-aet", "STORESCP", "+xa", "-od", str(folder), str(port)):
        yield port, folder


def _received_uids(folder: Path) -> list[str]:
    return sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in folder.iterdir()
        if p.is_file()
    )


def test_cget_to_orthanc_rest(orthanc_factory, tmp_path, ledger_path, ledger_url):
    pacs = _pacs(orthanc_factory)
    target = orthanc_factory("target")
    instances = fill(pacs, N, seed=61)
    result = run_cli("replicate", _dicom_url(pacs), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    _same_instances(target, instances)
    assert state_counts(ledger_path) == {"sent": N}
    # The byte proof holds on the Orthanc target: the Part-10 file sent is what it keeps.
    verified = run_cli("verify", "--ledger", ledger_url)
    assert verified.code == 0, verified.stdout + verified.stderr
    assert f"{N} match" in verified.stdout


def test_cmove_to_orthanc_rest(orthanc_factory, tmp_path, ledger_path, ledger_url):
    move_port = free_port()
    pacs = _pacs(orthanc_factory, move_port)
    target = orthanc_factory("target")
    instances = fill(pacs, N, seed=62)
    config = _config(tmp_path, retrieve="move", move_port=move_port)
    result = run_cli(
        "replicate", _dicom_url(pacs), target.url, "--ledger", ledger_url, "--config", config
    )
    assert result.code == 0, result.stderr
    assert "C-MOVE to MIGRATOR" in result.stderr
    _same_instances(target, instances)
    assert state_counts(ledger_path) == {"sent": N}


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_dcmqrscp_source(retrieve, orthanc_factory, tmp_path, ledger_path, ledger_url):
    """DCMTK's dcmqrscp (a Q/R SCP over its own file store) as the source."""
    port, move_port = free_port(), free_port()
    store = tmp_path / "qr"
    store.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\nmigrator = (MIGRATOR, 127.0.0.1, {move_port})\nHostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQRSCP {store} RW (200, 1024mb) ANY\nAETable END\n"
    )
    instances = make_dataset(N, seed=72)
    files = _files(tmp_path / "files", instances)
    with dcmtk(port, "dcmqrscp", "-c", str(config)):
        subprocess.run(
            ["storescu", "-aec", "QRSCP", "+sd", "127.0.0.1", str(port), str(files)],
            check=True,
            capture_output=True,
        )
        target = orthanc_factory("target")
        settings = _config(tmp_path, retrieve=retrieve, move_port=move_port)
        result = run_cli(
            "replicate",
            f"dicom://QRSCP@127.0.0.1:{port}",
            target.url,
            "--ledger",
            ledger_url,
            "--config",
            settings,
        )
    assert result.code == 0, result.stderr
    _same_instances(target, instances)
    assert state_counts(ledger_path) == {"sent": N}


def test_cmove_destination_unknown_is_fatal(orthanc_factory, tmp_path, ledger_path, ledger_url):
    """A peer that does not know our AE as a move destination stops the run (exit 3):
    nothing is marked, whatever the number of rows."""
    pacs = _pacs(orthanc_factory)
    target = orthanc_factory("target")
    fill(pacs, 4, seed=63)
    config = _config(tmp_path, retrieve="move", move_port=free_port(), aet="STRANGER")
    result = run_cli(
        "replicate", _dicom_url(pacs), target.url, "--ledger", ledger_url, "--config", config
    )
    assert result.code == 3, result.stderr
    result.assert_one_line_error()
    assert "did not move an instance to us" in result.stderr
    assert not ledger_path.exists() or state_counts(ledger_path).get("sent", 0) == 0
    assert target.count() == 0


def test_orthanc_rest_to_storescp(orthanc_factory, storescp, ledger_path, ledger_url):
    port, folder = storescp
    source = orthanc_factory("source")
    instances = fill(source, N, seed=64)
    result = run_cli(
        "replicate", source.url, f"dicom://STORESCP@127.0.0.1:{port}", "--ledger", ledger_url
    )
    assert result.code == 0, result.stderr
    assert _received_uids(folder) == sorted(i.sop_uid for i in instances)
    assert state_counts(ledger_path) == {"sent": N}
    # A peer that wraps the dataset in a file meta of its own cannot be compared by MD5:
    # none is computed to be recorded.
    assert ledger_rows(ledger_path, "SELECT COUNT(md5) FROM instances") == [(0,)]


def test_storage_file_unlike_its_index_md5_is_never_stored(tmp_path, ledger_path, ledger_url):
    """Without an MD5 to record, the one in an Orthanc storage index is still checked before
    a C-STORE: a file swapped for other bytes is rejected and never reaches the peer."""
    instances = make_dataset(4, seed=173)
    with OrthancProcess(tmp_path / "old") as old:
        upload_all(old, instances)
    storage = tmp_path / "old" / "storage"
    with sqlite3.connect(storage / "index") as index:
        files = dict(
            index.execute(
                "SELECT r.publicId, a.uuid FROM Resources r JOIN AttachedFiles a "
                "ON a.id = r.internalId AND a.fileType = 1"
            ).fetchall()
        )
    swapped = instances[1]
    uuid = files[swapped.orthanc_id]
    (storage / uuid[:2] / uuid[2:4] / uuid).write_bytes(make_dataset(1, seed=174)[0].data)
    received = tmp_path / "received"
    received.mkdir()
    result = _import_to_storescp(storage, ledger_url, "+xa", "-od", str(received))
    assert result.code == 1, result.stderr
    assert state_counts(ledger_path) == {"sent": 3, "rejected": 1}
    assert _received_uids(received) == sorted(i.sop_uid for i in instances if i is not swapped)
    ((key, error),) = ledger_rows(
        ledger_path, "SELECT source_key, last_error FROM instances WHERE state = 'rejected'"
    )
    assert swapped.orthanc_id in key and "differs from expected" in error
    # What was checked is recorded: the index's MD5 of each file sent.
    sent = ledger_rows(ledger_path, "SELECT md5 FROM instances WHERE state = 'sent'")
    assert len(sent) == 3 and all(len(md5 or "") == 32 for (md5,) in sent)


def _rle(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_context_refused_by_the_peer_is_rejected(tmp_path, ledger_path, ledger_url):
    """storescp accepts uncompressed transfer syntaxes only (no +xa): the RLE file's
    context is refused (and RLE is not re-encoded), that row ends `rejected`, the others
    are stored."""
    instances = make_dataset(4, seed=71)
    folder = _files(tmp_path / "files", instances, first=_rle(instances[0].data))
    received = tmp_path / "received"
    received.mkdir()
    result = _import_to_storescp(folder, ledger_url, "-od", str(received))
    assert result.code == 1, result.stderr
    assert state_counts(ledger_path) == {"sent": 3, "rejected": 1}
    assert _received_uids(received) == sorted(i.sop_uid for i in instances[1:])
    (reason,) = ledger_rows(ledger_path, "SELECT last_error FROM instances WHERE state='rejected'")
    assert "RLE" in reason[0]


def test_folder_to_dimse_orthanc_and_verify_present(orthanc_factory, tmp_path, ledger_url):
    instances = make_dataset(N, seed=65)
    folder = _files(tmp_path / "files", instances)
    pacs = _pacs(orthanc_factory)
    result = run_cli("import", str(folder), _dicom_url(pacs), "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    assert sorted(pacs.instance_ids()) == sorted(i.orthanc_id for i in instances)
    verified = run_cli("verify", "--ledger", ledger_url)
    assert verified.code == 0, verified.stdout + verified.stderr
    assert f"{N} present" in verified.stdout
    # An instance deleted on the peer is found missing by C-FIND.
    pacs.delete_instance(instances[0].orthanc_id)
    again = run_cli("verify", "--all", "--ledger", ledger_url)
    assert again.code == 1, again.stdout
    assert "1 missing" in again.stdout


def test_kill_mid_run_then_rerun(orthanc_factory, tmp_path, ledger_path, ledger_url):
    pacs = _pacs(orthanc_factory)
    target = orthanc_factory("target")
    n = 40
    instances = fill(pacs, n, seed=66)
    args = ("replicate", _dicom_url(pacs), target.url, "--ledger", ledger_url)
    proc = start_cli(*args, "--max-rate", "40", env={"MIGRATOR_PROGRESS": "none"})
    try:
        wait_for_sent(ledger_path, 8)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert state_counts(ledger_path).get("sent", 0) < n
    result = run_cli(*args)
    assert result.code == 0, result.stderr
    assert state_counts(ledger_path) == {"sent": n}
    _same_instances(target, instances)


def _dated(instances: list[SyntheticInstance]) -> list[bytes]:
    """The files with one StudyDate per study, a year apart (2019, 2020...)."""
    years = {uid: 2019 + i for i, uid in enumerate(dict.fromkeys(i.study_uid for i in instances))}
    out = []
    for inst in instances:
        ds = pydicom.dcmread(io.BytesIO(inst.data))
        ds.StudyDate = f"{years[inst.study_uid]}0615"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_capped_study_search_is_split_by_date(orthanc_factory, ledger_path, ledger_url):
    """A peer answering at most 2 studies per C-FIND: the listing halves StudyDate ranges
    until every study is listed."""
    pacs = _pacs(orthanc_factory, LimitFindResults=2)
    target = orthanc_factory("target")
    instances = make_dataset(30, studies=6, series_per_study=1, seed=69)
    upload_all(pacs, _dated(instances))
    result = run_cli("replicate", _dicom_url(pacs), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    assert "capped" in result.stderr
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in instances)
    dates = ledger_rows(ledger_path, "SELECT DISTINCT study_date FROM instances")
    assert sorted(d for (d,) in dates) == [f"{y}0615" for y in range(2019, 2025)]


def test_unknown_called_ae_is_one_line_exit_3(orthanc_factory, ledger_path, ledger_url):
    pacs = _pacs(orthanc_factory, DicomCheckCalledAet=True)
    target = orthanc_factory("target")
    fill(pacs, 2, seed=67)
    result = run_cli("replicate", _dicom_url(pacs, "NOBODY"), target.url, "--ledger", ledger_url)
    assert result.code == 3
    result.assert_one_line_error()
    assert "called AE title not recognised" in result.stderr
    assert not ledger_path.exists() or state_counts(ledger_path).get("sent", 0) == 0


def test_refused_association_marks_nothing(tmp_path, ledger_path, ledger_url):
    folder = _files(tmp_path / "files", make_dataset(4, seed=68))
    result = _import_to_storescp(folder, ledger_url, "--refuse")
    assert result.code == 3
    result.assert_one_line_error()
    assert "association rejected" in result.stderr
    assert not ledger_path.exists() or state_counts(ledger_path).get("sent", 0) == 0


def test_status_classes():
    """The one classification of DIMSE outcomes (errors.py)."""
    store = lambda s: verdict_for_dimse_status(s, side="target", operation="C-STORE")  # noqa: E731
    assert store(0x0000) is None
    assert store(0xB000) is None
    for refused in (0xA700, 0xA900, 0xC000, 0xC123):
        assert store(refused).kind is Kind.PERMANENT
    assert store(None).kind is Kind.RETRYABLE
    move = verdict_for_dimse_status(0xA801, side="source", operation="C-MOVE")
    assert move.kind is Kind.FATAL
    assoc = lambda r: verdict_for_association(r, side="target", peer="p", connected=True)  # noqa: E731
    assert assoc((1, 1, 7)).kind is Kind.FATAL
    assert assoc((2, 3, 2)).kind is Kind.RETRYABLE
    assert assoc(None).kind is Kind.RETRYABLE
    refused = verdict_for_association(None, side="target", peer="p", connected=False)
    assert refused.kind is Kind.RETRYABLE


def test_instance_deleted_after_listing_is_vanished(orthanc_factory):
    """A retrieval that brings nothing is `vanished` once C-FIND no longer finds the
    instance (Orthanc fails a C-GET matching nothing like any other failure); the others
    of its series still come (by series)."""
    import asyncio

    from migrator.config import Settings
    from migrator.ends.dimse.peer import parse_dicom_url
    from migrator.ends.dimse.source import DimseSource
    from migrator.errors import TransferError

    pacs = _pacs(orthanc_factory)
    instances = fill(pacs, 4, seed=73)

    class Row:
        def __init__(self, key: str) -> None:
            self.source_key, self.path, self.size, self.md5, self.orthanc_id = (
                key,
                None,
                None,
                None,
                None,
            )

    async def run() -> tuple[Kind, int]:
        peer = parse_dicom_url(_dicom_url(pacs), "source", "MIGRATOR")
        source = DimseSource(peer, Settings(concurrency=4))
        try:
            await source.preflight()
            rows = {
                r["sop_uid"]: r["source_key"] async for p in source.listing(None) for r in p.rows
            }
            pacs.delete_instance(instances[0].orthanc_id)
            try:
                await source.fetch(Row(rows[instances[0].sop_uid]))
                kind = None
            except TransferError as exc:
                kind = exc.verdict.kind
            other = await source.fetch(Row(rows[instances[1].sop_uid]))
            return kind, len(other)
        finally:
            await source.aclose()

    kind, size = asyncio.run(run())
    assert kind is Kind.VANISHED
    assert size > 0


@pytest.mark.parametrize("max_length", [0, 16384, 1000, 7])
def test_store_request_pdus_are_pynetdicoms(max_length):
    """The C-STORE-RQ written straight to the socket is, byte for byte, what pynetdicom
    would send for the same message: command set, PDV headers, fragments at the peer's
    maximum PDU length (0: one fragment each)."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    from migrator.ends.dimse.pdu import pdata_pdus, store_rq_command

    dataset = bytes(range(256)) * 40 + b"odd"
    req = C_STORE()
    req.MessageID = 77
    req.Priority = 2
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    req.AffectedSOPInstanceUID = "1.2.3.45"
    req.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    theirs = []
    for primitive in message.encode_msg(3, max_length):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        theirs.append(pdu.encode())
    command = store_rq_command(77, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID)
    ours = list(pdata_pdus(3, command, memoryview(dataset), max_length))
    assert ours == theirs


def test_association_the_peer_dropped_while_idle_is_replaced(tmp_path):
    """A store association keeps its pynetdicom reactor paused between C-STOREs, so that
    `is_established` alone does not show the peer ending it: a storescp stopped and
    started again between two stores costs a new association, not a store failed after
    the DIMSE timeout."""
    import asyncio

    from migrator.config import Settings
    from migrator.ends.dimse.peer import parse_dicom_url
    from migrator.ends.dimse.target import DimseTarget

    instances = make_dataset(2, seed=73)
    port = free_port()
    cmd = ("storescp", "-aet", "STORESCP", "-od", str(tmp_path), str(port))
    peer = parse_dicom_url(f"dicom://STORESCP@127.0.0.1:{port}", "target", "MIGRATOR")
    target = DimseTarget(peer, Settings(concurrency=1, timeout=5.0))

    async def store(data: bytes) -> float:
        began = time.monotonic()
        assert (await target.store(data)).status == "Success"
        return time.monotonic() - began

    loop = asyncio.new_event_loop()
    try:
        with dcmtk(port, *cmd):
            loop.run_until_complete(store(instances[0].data))
            (held,) = target.stores.idle
        time.sleep(0.3)
        with dcmtk(port, *cmd):
            assert loop.run_until_complete(store(instances[1].data)) < 3.0
            assert target.stores.idle and target.stores.idle[0] is not held
            loop.run_until_complete(target.aclose())
    finally:
        loop.close()
    assert not held.is_established
    assert _received_uids(tmp_path) == sorted(i.sop_uid for i in instances)


def test_operations_go_on_while_one_more_association_waits(tmp_path):
    """storescp (no --fork) serves one association at a time and leaves a second one
    unanswered for EXTRA_WAIT (3 s): that association is opened in the background, the
    stores go on over the first meanwhile, and closing the target cuts the wait short."""
    import asyncio

    from migrator.config import Settings
    from migrator.ends.dimse.peer import EXTRA_WAIT, parse_dicom_url
    from migrator.ends.dimse.target import DimseTarget

    instances = make_dataset(6, seed=74)
    port = free_port()
    peer = parse_dicom_url(f"dicom://STORESCP@127.0.0.1:{port}", "target", "MIGRATOR")
    target = DimseTarget(peer, Settings(concurrency=4))

    async def run() -> tuple[float, float]:
        began = time.monotonic()
        stored = await asyncio.gather(*(target.store(i.data) for i in instances))
        assert all(s.status == "Success" for s in stored)
        middle = time.monotonic()
        await target.aclose()
        return middle - began, time.monotonic() - middle

    with dcmtk(port, "storescp", "-aet", "STORESCP", "-od", str(tmp_path), str(port)):
        storing, closing = asyncio.run(run())
    assert storing < EXTRA_WAIT / 2
    assert closing < EXTRA_WAIT / 2
    assert _received_uids(tmp_path) == sorted(i.sop_uid for i in instances)


def test_cmove_by_series(orthanc_factory, tmp_path, ledger_path, ledger_url):
    """C-MOVE asks for a whole series at once: the peer serves one C-MOVE per series, not
    one per instance (counted in the peer's own log), and every instance still arrives."""
    move_port = free_port()
    pacs = _pacs(orthanc_factory, move_port)
    target = orthanc_factory("target")
    instances = fill(pacs, N, seed=63)
    with pacs.client() as http:
        http.put("/tools/log-level", content="verbose").raise_for_status()
    series = {i.series_uid for i in instances}
    assert len(series) < N
    config = _config(tmp_path, retrieve="move", move_port=move_port)
    result = run_cli(
        "replicate", _dicom_url(pacs), target.url, "--ledger", ledger_url, "--config", config
    )
    assert result.code == 0, result.stderr
    _same_instances(target, instances)
    assert state_counts(ledger_path) == {"sent": N}
    levels, moving = [], False
    for line in pacs.log_path.read_text().splitlines():
        if "Move-SCU request received" in line:
            moving = True
        elif moving and (level := re.search(r"QueryRetrieveLevel = (\w+)", line)):
            levels.append(level[1])
            moving = False
    assert levels.count("SERIES") == len(series), levels
    # One instance moved alone: the one moved to ourselves at preflight.
    assert levels.count("IMAGE") == 1, levels


def test_asynchronous_cmove_peer_is_named(orthanc_factory, tmp_path, ledger_path, ledger_url):
    """A peer that answers a C-MOVE before moving anything (Orthanc with SynchronousCMove
    false) stops the run with that reason, not as an unknown move destination."""
    move_port = free_port()
    pacs = _pacs(orthanc_factory, move_port, SynchronousCMove=False)
    fill(pacs, 2, seed=64)
    config = _config(tmp_path, retrieve="move", move_port=move_port)
    result = run_cli(
        "replicate",
        _dicom_url(pacs),
        orthanc_factory("target").url,
        "--ledger",
        ledger_url,
        "--config",
        config,
    )
    assert result.code == 3, result.stderr
    result.assert_one_line_error()
    assert "moves asynchronously" in result.stderr, result.stderr
    assert not ledger_path.exists() or state_counts(ledger_path).get("sent", 0) == 0
