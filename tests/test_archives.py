"""ZIP archives in a folder to import: every member a row, sent like a loose file, against
real Orthanc processes; damaged archives rejected without stopping the run; the listing
resumes inside an archive; no archive is ever sent whole."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ledger_rows, run_cli, start_cli, state_counts

from migrator.ends.folder import archives
from migrator.ends.folder.walk import iter_tree
from migrator.testkit.dicomgen import SyntheticInstance, make_dataset, make_instance
from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.orthanc import OrthancProcess


def _zip(members: list[tuple[str, bytes]], *, method: int = zipfile.ZIP_DEFLATED, **kw) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method, **kw) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buf.getvalue()


def _latin1_name(data: bytes, placeholder: str, raw: bytes) -> bytes:
    """Rename a member to bytes that are not UTF-8, without the UTF-8 flag, as old tools
    wrote them (zipfile itself always writes UTF-8)."""
    assert len(placeholder.encode()) == len(raw)
    return data.replace(placeholder.encode(), raw)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _assert_holds(target: OrthancProcess, expected: list[SyntheticInstance]) -> None:
    """Exactly these instances, byte for byte."""
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in expected)
    for inst in expected:
        assert _md5(target.file(inst.orthanc_id)) == _md5(inst.data)


def _rows(ledger: Path) -> dict[str, tuple[str, str | None]]:
    rows = ledger_rows(ledger, "SELECT source_key, state, last_error FROM instances")
    return {key: (state, error) for key, state, error in rows}


def _mixed_folder(root: Path, d: list[SyntheticInstance]) -> None:
    """Loose files and archives: deflated, nested, found by magic only, a non-UTF-8 name,
    ZIP64, a duplicate of a loose file and a member that is not DICOM."""
    root.mkdir()
    (root / "loose").mkdir()
    (root / "loose" / "0.dcm").write_bytes(d[0].data)
    (root / "loose" / "1.dcm").write_bytes(d[1].data)
    (root / "a.zip").write_bytes(
        _zip([("s/2.dcm", d[2].data), ("s/3.dcm", d[3].data), ("copy/0.dcm", d[0].data),
              ("notes.txt", b"scanned at the front desk\n")])
    )  # fmt: skip
    inner = _zip([("in/4.dcm", d[4].data), ("in/5.dcm", d[5].data)], method=zipfile.ZIP_STORED)
    (root / "outer.zip").write_bytes(_zip([("inner.zip", inner), ("6.dcm", d[6].data)]))
    (root / "download.dat").write_bytes(_zip([("7.dcm", d[7].data)]))
    latin = _zip([("cafX.dcm", d[8].data)], method=zipfile.ZIP_STORED)
    (root / "latin.zip").write_bytes(_latin1_name(latin, "cafX.dcm", b"caf\xe9.dcm"))
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z64,
        z64.open("9.dcm", "w", force_zip64=True) as fh,
    ):
        fh.write(d[9].data)
    (root / "zip64.zip").write_bytes(buf.getvalue())


MIXED_MEMBERS = {
    "a.zip!s/2.dcm": 2,
    "a.zip!s/3.dcm": 3,
    "a.zip!copy/0.dcm": 0,
    "outer.zip!inner.zip!in/4.dcm": 4,
    "outer.zip!inner.zip!in/5.dcm": 5,
    "outer.zip!6.dcm": 6,
    "download.dat!7.dcm": 7,
    "latin.zip!caf\\xe9.dcm": 8,
    "zip64.zip!9.dcm": 9,
}


def test_folder_of_archives_sends_every_member(orthanc_factory, tmp_path, ledger_path, ledger_url):
    data = make_dataset(10, seed=151)
    root = tmp_path / "downloads"
    _mixed_folder(root, data)
    target = orthanc_factory("target")

    result = run_cli("import", str(root), target.url, "--ledger", ledger_url, "-c", "4")
    assert result.code == 0, result.stderr[-3000:]
    _assert_holds(target, data)
    rows = _rows(ledger_path)
    # One row per member and per loose file, nothing else (no row for an archive itself).
    expected_keys = {*MIXED_MEMBERS, "a.zip!notes.txt", "loose/0.dcm", "loose/1.dcm"}
    assert set(rows) == expected_keys
    assert rows["a.zip!notes.txt"] == ("skipped", "not DICOM: text")
    # Instance 0 twice (a loose file, a member): one copy sent, the other superseded.
    copies = [rows["loose/0.dcm"][0], rows["a.zip!copy/0.dcm"][0]]
    assert sorted(copies) == ["sent", "skipped"]
    assert state_counts(ledger_path) == {"sent": 10, "skipped": 2}
    ids = dict(ledger_rows(ledger_path, "SELECT source_key, orthanc_id FROM instances"))
    for key, index in MIXED_MEMBERS.items():
        assert ids[key] == data[index].orthanc_id, key

    verify = run_cli("verify", "--ledger", ledger_url, "--json")
    assert verify.code == 0, verify.stdout[-3000:] + verify.stderr[-2000:]
    (job,) = json.loads(verify.stdout)["jobs"]
    assert job["blocking"] == {}

    report = json.loads(run_cli("inspect", str(root), "--json").stdout)
    # a, outer, inner, download.dat, latin, zip64; every member but the inner archive.
    assert (report["archives"], report["archive_members"], report["damaged_archives"]) == (6, 10, 0)
    assert report["dicom_files"] == 11 and report["distinct_instances"] == 10


def _damaged_folder(root: Path, d: list[SyntheticInstance]) -> None:
    root.mkdir()
    (root / "0.dcm").write_bytes(d[0].data)
    (root / "good.zip").write_bytes(_zip([("1.dcm", d[1].data)]))
    whole = _zip([("x.dcm", d[5].data), ("y.dcm", d[6].data)])
    (root / "truncated.zip").write_bytes(whole[: len(whole) * 2 // 3])  # no central directory
    crc = _zip([("2.dcm", d[2].data), ("3.dcm", d[3].data)], method=zipfile.ZIP_STORED)
    at = crc.index(d[3].data) + len(d[3].data) - 10  # a pixel byte of the second member
    (root / "crc.zip").write_bytes(crc[:at] + bytes([crc[at] ^ 0xFF]) + crc[at + 1 :])
    level3 = _zip([("4.dcm", d[4].data)])
    (root / "deep.zip").write_bytes(_zip([("lvl2.zip", _zip([("lvl3.zip", level3)]))]))


DEEP = "deep.zip!lvl2.zip!lvl3.zip"


def test_damaged_archives_are_rejected_and_the_run_goes_on(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    data = make_dataset(7, seed=152)
    root = tmp_path / "damaged"
    _damaged_folder(root, data)
    target = orthanc_factory("target")

    result = run_cli("import", str(root), target.url, "--ledger", ledger_url)
    # Rows rejected: exit 1, like any rejected instance; every other member is sent.
    assert result.code == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rows = _rows(ledger_path)
    assert rows["truncated.zip"][0] == "rejected"
    assert rows["truncated.zip"][1].startswith("damaged ZIP archive: ")
    assert rows["crc.zip!3.dcm"][0] == "rejected"
    assert "Bad CRC-32" in rows["crc.zip!3.dcm"][1]
    assert rows[DEEP] == ("rejected", archives.TOO_DEEP)
    assert {k for k, (state, _) in rows.items() if state == "sent"} == {
        "0.dcm",
        "good.zip!1.dcm",
        "crc.zip!2.dcm",
    }
    assert len(rows) == 6  # a damaged archive is one row, whatever it held
    _assert_holds(target, data[:3])

    # Tried again, the archive too deep to open is read from its archive: it must never
    # reach the target whole (Orthanc would unpack it and store 4.dcm behind the ledger).
    assert run_cli("retry", "--ledger", ledger_url, "--state", "rejected").code == 0
    again = run_cli("import", str(root), target.url, "--ledger", ledger_url)
    assert again.code == 1, again.stderr[-3000:]
    rows = _rows(ledger_path)
    assert rows[DEEP][0] == "rejected"
    assert archives.NEVER_WHOLE in rows[DEEP][1]
    assert "Bad CRC-32" in rows["crc.zip!3.dcm"][1]
    assert rows["truncated.zip"][0] == "rejected"
    _assert_holds(target, data[:3])

    verify = run_cli("verify", "--ledger", ledger_url, "--json")
    # The target lacks whatever the rejected rows hold: the job is not complete.
    assert verify.code == 1
    (job,) = json.loads(verify.stdout)["jobs"]
    assert job["blocking"] == {"rejected": 3}

    report = json.loads(run_cli("inspect", str(root), "--json").stdout)
    # good, truncated, crc, deep, lvl2 (lvl3 is a member too deep to open).
    assert (report["archives"], report["damaged_archives"]) == (5, 1)


def test_listing_resumes_at_every_row_inside_archives(tmp_path):
    data = make_dataset(10, seed=153)
    root = tmp_path / "downloads"
    _mixed_folder(root, data)
    (root / "truncated.zip").write_bytes(b"PK\x03\x04 cut short")
    (root / "empty.zip").write_bytes(_zip([]))
    # A file name that is not UTF-8, and "!" in names (the separator of archive and member).
    (root / os.fsdecode(b"r\xe9sum\xe9!.zip")).write_bytes(_zip([("x!y.dcm", data[1].data)]))
    full = list(iter_tree(str(root)))
    keys = [row.cand.source_key for row in full]
    assert len(keys) == len(set(keys)) == 15
    assert "r\\xe9sum\\xe9\\x21.zip!x\\x21y.dcm" in keys
    # Each member is read back, whole, from what its row stores.
    reader = archives.ArchiveReader()
    members = [row for row in full if row.member and row.cand.orthanc_id]
    assert len(members) == 10
    for row in members:
        assert len(reader.read(row.cand.path)) == row.cand.size
    for i, row in enumerate(full):
        rest = [r.cand.source_key for r in iter_tree(str(root), row.rel, row.member)]
        assert keys[: i + 1] + rest == keys, (i, row.rel, row.member)


def test_member_size_is_bounded(tmp_path, monkeypatch):
    """A member declaring more than can be held is refused at listing, and classification
    never inflates more than its bound (a zip bomb of zeros costs no parsing)."""
    root = tmp_path / "bomb"
    root.mkdir()
    (root / "bomb.zip").write_bytes(
        _zip([("zeros.dcm", bytes(200 << 20)), ("big.dcm", bytes(3 << 20))])
    )
    monkeypatch.setattr(archives, "MAX_MEMBER_SIZE", 100 << 20)
    started = time.monotonic()
    rows = {r.cand.source_key: r for r in iter_tree(str(root))}
    assert time.monotonic() - started < 5
    zeros = rows["bomb.zip!zeros.dcm"]
    assert zeros.failure is not None and "declares 209715200 bytes" in zeros.failure
    big = rows["bomb.zip!big.dcm"]
    # Classified from its first megabyte: not DICOM, its declared size kept.
    assert big.failure is None and big.cand.size == 3 << 20 and big.cand.orthanc_id is None


def test_sigkill_while_listing_a_large_archive(orthanc_factory, tmp_path, ledger_path, ledger_url):
    n = 4000
    data = fast_dataset(n, seed=154)
    root = tmp_path / "big"
    root.mkdir()
    (root / "loose.dcm").write_bytes(data[0].data)
    (root / "study.zip").write_bytes(
        _zip([(f"img/{i:05d}.dcm", d.data) for i, d in enumerate(data)])
    )
    target = orthanc_factory("target")
    args = ("import", str(root), target.url, "--ledger", ledger_url, "-c", "4")
    proc = start_cli(*args, env={"MIGRATOR_PROGRESS": "none"})

    def inside_archive() -> bool:
        cursor, done = ledger_rows(ledger_path, "SELECT listing_cursor, listing_done FROM jobs")[0]
        return not done and cursor is not None and "member" in json.loads(cursor)

    deadline = time.monotonic() + 60
    while True:
        try:
            if inside_archive():
                break
        except (sqlite3.Error, IndexError):
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the listing never stopped inside the archive"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    listed = ledger_rows(ledger_path, "SELECT COUNT(*) FROM instances")[0][0]
    assert 0 < listed < n + 1

    result = run_cli("import", *args[1:], timeout=300)
    assert result.code == 0, result.stderr[-3000:]
    rows = ledger_rows(ledger_path, "SELECT source_key, state FROM instances")
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)) == n + 1  # every member once, the loose file
    assert state_counts(ledger_path) == {"sent": n, "skipped": 1}
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)


@pytest.mark.parametrize(
    "head,name,expected",
    [
        (b"PK\x03\x04" + bytes(200), "x.bin", True),
        (b"PK\x05\x06" + bytes(30), "empty", True),
        (b"PK\x03\x04" + bytes(124) + b"DICM", "dual.dcm", False),  # a DICOM preamble
        (b"\x08\x00\x05\x00" + bytes(200), "x.zip", True),  # by name: damaged if not a ZIP
        (b"\x08\x00\x05\x00" + bytes(200), "x.dcm", False),
    ],
)
def test_archive_detection(tmp_path, head, name, expected):
    path = tmp_path / name
    path.write_bytes(head)
    assert archives.is_archive(str(path)) is expected


def test_member_with_a_long_header_is_read_further(tmp_path):
    """Identifiers beyond the first megabyte (a large private element before them): the
    member is read further, up to its bound, rather than called incomplete."""
    inst = make_dataset(1, seed=155)[0]
    data = make_instance(
        inst.patient_id, inst.study_uid, inst.series_uid, inst.sop_uid, extra_bytes=2 << 20
    )
    root = tmp_path / "long"
    root.mkdir()
    (root / "long.zip").write_bytes(_zip([("long.dcm", data)]))
    (row,) = iter_tree(str(root))
    assert row.failure is None and row.cand.skip_reason is None
    assert (row.cand.orthanc_id, row.cand.has_pixels) == (inst.orthanc_id, True)
    assert row.cand.size == len(data)
    assert archives.ArchiveReader().read(row.cand.path) == data


def test_member_gone_or_archive_changed(tmp_path):
    """Rows read after the archive changed: a member no longer there is gone (the row ends
    vanished), a new version of the archive is read afresh, a deleted archive is gone."""
    data = make_dataset(2, seed=156)
    root = tmp_path / "changing"
    root.mkdir()
    zpath = root / "a.zip"
    zpath.write_bytes(_zip([("0.dcm", data[0].data), ("1.dcm", data[1].data)]))
    rows = {r.cand.source_key: r.cand.path for r in iter_tree(str(root))}
    reader = archives.ArchiveReader()
    assert reader.read(rows["a.zip!0.dcm"]) == data[0].data
    zpath.write_bytes(_zip([("1.dcm", data[1].data + b"\0\0")]))
    os.utime(zpath, ns=(1, 1))  # the same second as before must not hide the change
    with pytest.raises(archives.MemberGone):
        reader.read(rows["a.zip!0.dcm"])
    assert reader.read(rows["a.zip!1.dcm"]) == data[1].data + b"\0\0"
    zpath.unlink()
    with pytest.raises(FileNotFoundError):
        reader.read(rows["a.zip!1.dcm"])
