"""Tests of the import source side: storage folders written by a real Orthanc 1.10.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from migrator.ends.folder.fileclass import DICOMDIR_SOP_CLASS, HELD_STORAGE, HELD_TREE
from migrator.ends.folder.inspect import inspect_path, render_text
from migrator.ends.folder.storage import (
    CorruptFile,
    IndexLocked,
    classify_file,
    detect,
    index_summary,
    iter_folder,
    iter_index,
    iter_orphans,
    read_dicom_bytes,
    walk_files,
)
from migrator.testkit import OrthancProcess, SyntheticInstance, make_dataset, upload_all
from migrator.testkit.dicomgen import orthanc_compressed, without_pixel_data

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.environ.get("MIGRATOR_ORTHANC_BIN", "/usr/sbin/Orthanc")),
    reason="Orthanc binary not installed",
)

N = 6


@dataclass
class Store:
    """A storage folder written by Orthanc, and the files that were uploaded into it."""

    storage: Path
    instances: list[SyntheticInstance]

    @property
    def by_id(self) -> dict[str, SyntheticInstance]:
        return {inst.orthanc_id: inst for inst in self.instances}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _build_store(workdir: Path, seed: int, **extra: object) -> Store:
    instances = make_dataset(N, seed=seed)
    orthanc = OrthancProcess(workdir, extra=dict(extra))
    with orthanc:
        answers = upload_all(orthanc, instances)
    assert [a["Status"] for a in answers] == ["Success"] * N
    return Store(orthanc.storage_dir, instances)


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return _build_store(tmp_path_factory.mktemp("plain"), seed=11)


@pytest.fixture(scope="module")
def compressed_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return _build_store(tmp_path_factory.mktemp("compressed"), seed=12, StorageCompression=True)


def _copy(store: Store, dest: Path) -> Path:
    shutil.copytree(store.storage, dest)
    return dest


# --- index listing --------------------------------------------------------------------


def test_plain_index_lists_exactly_the_uploads(plain_store: Store) -> None:
    rows = list(iter_index(str(plain_store.storage)))
    assert sorted(c.orthanc_id for _, c in rows) == sorted(plain_store.by_id)
    cursors = [cursor for cursor, _ in rows]
    assert cursors == sorted(cursors)
    for _, cand in rows:
        original = plain_store.by_id[cand.orthanc_id]
        assert cand.source_key == cand.orthanc_id
        assert (cand.sop_uid, cand.series_uid, cand.study_uid) == (
            original.sop_uid,
            original.series_uid,
            original.study_uid,
        )
        assert not cand.compressed and not cand.missing and cand.skip_reason is None
        assert cand.size == len(original.data)
        data = read_dicom_bytes(cand.path, cand.compressed)
        assert data == original.data
        assert cand.md5 == _md5(data) == _md5(original.data)
    # Reading a cleanly stopped index leaves nothing behind in the source folder.
    assert sorted(p.name for p in plain_store.storage.glob("index*")) == ["index"]


def test_index_resume_cursor(plain_store: Store) -> None:
    rows = list(iter_index(str(plain_store.storage / "index"), batch=2))
    for k, (cursor, _) in enumerate(rows):
        rest = [c.orthanc_id for _, c in iter_index(str(plain_store.storage), after=cursor)]
        assert rest == [c.orthanc_id for _, c in rows[k + 1 :]]
    assert [c.orthanc_id for _, c in iter_index(str(plain_store.storage), after=0)] == [
        c.orthanc_id for _, c in rows
    ]


def test_compressed_index(compressed_store: Store) -> None:
    rows = list(iter_index(str(compressed_store.storage)))
    assert len(rows) == N
    for _, cand in rows:
        original = compressed_store.by_id[cand.orthanc_id]
        assert cand.compressed
        assert os.path.getsize(cand.path) < len(original.data)
        data = read_dicom_bytes(cand.path, True)
        assert data == read_dicom_bytes(cand.path) == original.data
        assert cand.md5 == _md5(data) == _md5(original.data)
        assert cand.size == len(original.data)
    summary = index_summary(str(compressed_store.storage))
    # 1.10.1 with StorageCompression writes a header-only copy (type 3) per instance.
    assert summary["attachments"] == {"dicom": N, "dicom-until-pixel-data": N}
    assert summary["schema_version"] == 6
    assert summary["instances"] == N
    assert summary["compression"] is True
    assert summary["dicom_bytes"] == sum(len(i.data) for i in compressed_store.instances)
    assert summary["dicom_stored_bytes"] < summary["dicom_bytes"]


def test_plain_summary_and_layout(plain_store: Store) -> None:
    summary = index_summary(str(plain_store.storage))
    assert summary["attachments"] == {"dicom": N}
    assert summary["compression"] is False
    assert summary["dicom_bytes"] == summary["dicom_stored_bytes"]
    info = detect(str(plain_store.storage))
    assert (info.kind, info.index) == ("orthanc-index", str(plain_store.storage / "index"))
    assert detect(str(plain_store.storage / "index")).kind == "orthanc-index"
    files = list(walk_files(str(plain_store.storage)))
    assert len(files) == N and all(len(f.split("/")) == 3 for f in files)


def test_missing_and_orphan_files_schema_5(plain_store: Store, tmp_path: Path) -> None:
    storage = _copy(plain_store, tmp_path / "db-v5")
    # An index as Orthanc 0.8.5-1.3 left it: schema 5, no GlobalIntegers.
    with sqlite3.connect(storage / "index") as db:
        db.execute("UPDATE GlobalProperties SET value = '5' WHERE property = 1")
        db.execute("DROP TABLE GlobalIntegers")
    db.close()
    first, second = (c for _, c in list(iter_index(str(storage)))[:2])
    os.unlink(first.path)
    stray = "0123abcd-0000-4000-8000-000000000000"
    (storage / "01" / "23").mkdir(parents=True)
    shutil.copy(second.path, storage / "01" / "23" / stray)

    missing = [c.orthanc_id for _, c in iter_index(str(storage)) if c.missing]
    assert missing == [first.orthanc_id]
    assert list(iter_orphans(str(storage))) == [f"01/23/{stray}"]
    report = inspect_path(str(storage))
    assert report["schema_version"] == 5
    assert (report["missing_files"], report["orphan_files"]) == (1, 1)
    assert report["orphan_examples"] == [f"01/23/{stray}"]
    assert "missing files:" in render_text(report)


def test_running_orthanc_locks_index(tmp_path: Path) -> None:
    inst = make_dataset(1, seed=13)[0]
    orthanc = OrthancProcess(tmp_path / "live")
    try:
        orthanc.start()
        orthanc.upload(inst.data)
        with pytest.raises(IndexLocked, match="is Orthanc still running on it"):
            list(iter_index(str(orthanc.storage_dir)))
        with pytest.raises(IndexLocked):
            inspect_path(str(orthanc.storage_dir))
        # A killed Orthanc leaves its write-ahead log: the listing must include it.
        assert orthanc.pid is not None
        os.kill(orthanc.pid, signal.SIGKILL)
    finally:
        orthanc.stop()
    assert (orthanc.storage_dir / "index-wal").exists()
    rows = list(iter_index(str(orthanc.storage_dir)))
    assert [c.orthanc_id for _, c in rows] == [inst.orthanc_id]
    assert read_dicom_bytes(rows[0][1].path) == inst.data


# --- storage without index ------------------------------------------------------------


def test_compressed_store_without_index(compressed_store: Store, tmp_path: Path) -> None:
    storage = _copy(compressed_store, tmp_path / "noindex")
    (storage / "index").unlink()
    assert detect(str(storage)).kind == "orthanc-storage-no-index"
    cands = list(iter_folder(str(storage)))
    assert len(cands) == 2 * N
    full = [c for c in cands if c.skip_reason is None]
    # Held until the listing is complete; the full twins make them header-only then.
    header_only = [c for c in cands if c.skip_reason == HELD_STORAGE]
    assert len(full) == len(header_only) == N
    assert all(c.compressed for c in cands)
    assert {c.orthanc_id for c in full} == {c.orthanc_id for c in header_only}
    for cand in full:
        original = compressed_store.by_id[cand.orthanc_id]
        assert cand.has_pixels is True and cand.size == len(original.data)
        assert cand.md5 == _md5(read_dicom_bytes(cand.path)) == _md5(original.data)
        assert cand.source_key == os.path.relpath(cand.path, storage)
    for cand in header_only:
        assert cand.has_pixels is False
        assert cand.size < len(compressed_store.by_id[cand.orthanc_id].data)

    report = inspect_path(str(storage))
    assert report["kind"] == "orthanc-storage-no-index"
    assert report["files"] == 2 * N
    assert report["dicom_files"] == report["distinct_instances"] == N
    assert report["compressed_files"] == 2 * N
    assert report["header_only"] == N
    assert report["no_pixel_instances"] == 0
    assert report["advice"] == f"migrator import {storage} http://TARGET:8042/"


# --- a mixed folder -----------------------------------------------------------------------


def _raw_dataset(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, ds)
    return out.getvalue()


def _dicomdir() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOMDIR_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "TEST"
    ds.DirectoryRecordSequence = []
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, list[SyntheticInstance]]:
    inst = make_dataset(6, seed=14)
    root = tmp_path / "mixed"
    files = {
        "a/one.dcm": inst[0].data,
        "a/one-copy.dcm": inst[0].data,
        "a/sub/two.dcm": inst[1].data,
        "a/sub/two-header.dcm": without_pixel_data(inst[1].data),
        "b/alone-header.dcm": without_pixel_data(inst[2].data),
        "b/raw-no-preamble": _raw_dataset(inst[3].data),
        "b/truncated.dcm": inst[4].data[:-100],
        "b/cut-in-header.dcm": inst[4].data[:300],
        "c/5b/0e/5b0e0000-0000-4000-8000-000000000005": orthanc_compressed(inst[5].data),
        "c/corrupt-compressed": orthanc_compressed(inst[5].data)[:-20],
        "DICOMDIR": _dicomdir(),
        "summary.json": json.dumps({"0008,0018": {"Name": "SOPInstanceUID", "Value": "1"}}),
        "other.json": json.dumps({"hello": 1}),
        "notes.txt": "not a DICOM file\n",
        "empty": b"",
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root, inst


def test_mixed_folder_classification(mixed: tuple[Path, list[SyntheticInstance]]) -> None:
    root, inst = mixed
    assert detect(str(root)).kind == "dicom-tree"
    cands = {c.source_key: c for c in iter_folder(str(root))}
    sent = {k for k, c in cands.items() if c.skip_reason is None}
    assert sent == {
        "a/one.dcm",
        "a/one-copy.dcm",
        "a/sub/two.dcm",
        "b/raw-no-preamble",
        "b/truncated.dcm",
        # Cut before its identifiers: offered to the target, which alone can tell.
        "b/cut-in-header.dcm",
        "c/5b/0e/5b0e0000-0000-4000-8000-000000000005",
    }
    reasons = {k: c.skip_reason for k, c in cands.items() if c.skip_reason}
    # Not an Orthanc storage layout: held, then skipped only if a copy with pixels exists.
    assert reasons["a/sub/two-header.dcm"] == HELD_TREE
    assert reasons["b/alone-header.dcm"] == HELD_TREE
    assert reasons["DICOMDIR"] == "DICOMDIR"
    assert reasons["summary.json"] == "JSON summary (DicomAsJson)"
    assert reasons["empty"] == "empty file"
    assert reasons["other.json"].startswith("not DICOM")
    assert reasons["notes.txt"].startswith("not DICOM")
    assert cands["b/cut-in-header.dcm"].orthanc_id is None
    assert cands["b/cut-in-header.dcm"].undecided is not None
    assert reasons["c/corrupt-compressed"].startswith("corrupt compressed file")

    assert cands["a/one.dcm"].orthanc_id == cands["a/one-copy.dcm"].orthanc_id == inst[0].orthanc_id
    two, header = cands["a/sub/two.dcm"], cands["a/sub/two-header.dcm"]
    assert two.orthanc_id == header.orthanc_id == inst[1].orthanc_id
    assert (two.has_pixels, header.has_pixels) == (True, False)
    assert header.size is not None and two.size is not None and header.size < two.size
    assert cands["b/raw-no-preamble"].orthanc_id == inst[3].orthanc_id
    truncated = cands["b/truncated.dcm"]
    assert truncated.orthanc_id == inst[4].orthanc_id
    assert truncated.problem is not None and truncated.problem.startswith("truncated DICOM")
    packed = cands["c/5b/0e/5b0e0000-0000-4000-8000-000000000005"]
    assert packed.compressed and packed.md5 == _md5(inst[5].data)
    assert read_dicom_bytes(packed.path) == inst[5].data
    assert read_dicom_bytes(cands["a/one.dcm"].path, False) == inst[0].data

    report = inspect_path(str(root))
    expected = {
        "files": 15,
        # b/alone-header.dcm has no copy with pixel data: an instance to send.
        "dicom_files": 7,
        "compressed_files": 2,
        "json_summaries": 1,
        "dicomdir": 1,
        "empty_files": 1,
        "other_files": 3,
        # b/cut-in-header.dcm: offered to the target.
        "undecided_files": 1,
        "truncated": 1,
        "header_only": 1,
        "no_pixel_instances": 1,
        "distinct_instances": 6,
        "duplicates": 1,
    }
    assert {k: report[k] for k in expected} == expected
    text = render_text(report)
    assert "copies without pixels" in text and "header-only" not in text
    assert text.endswith(report["advice"])


def test_corrupt_compressed_files(mixed: tuple[Path, list[SyntheticInstance]]) -> None:
    root, inst = mixed
    with pytest.raises(CorruptFile, match="truncated"):
        read_dicom_bytes(str(root / "c" / "corrupt-compressed"), True)
    bad_size = root / "bad-size"
    packed = orthanc_compressed(inst[0].data)
    bad_size.write_bytes(struct.pack("<Q", len(inst[0].data) + 5) + packed[8:])
    with pytest.raises(CorruptFile, match="size mismatch"):
        read_dicom_bytes(str(bad_size))
    assert classify_file(str(bad_size)).skip_reason.startswith("corrupt compressed file")
    with pytest.raises(CorruptFile):
        read_dicom_bytes(str(root / "notes.txt"), True)


def test_implicit_vr_file(tmp_path: Path) -> None:
    data = make_dataset(1, seed=15)[0]
    ds = pydicom.dcmread(io.BytesIO(data.data))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    cand = classify_file(str(path), str(tmp_path))
    assert (cand.source_key, cand.orthanc_id, cand.has_pixels) == (
        "implicit.dcm",
        data.orthanc_id,
        True,
    )
    assert cand.problem is None
    path.write_bytes(path.read_bytes()[:-10])
    assert "truncated" in (classify_file(str(path)).problem or "")


# --- walking ----------------------------------------------------------------------------


def test_walk_order_and_resume(mixed: tuple[Path, list[SyntheticInstance]]) -> None:
    root, _ = mixed
    (root / "a-b").mkdir()
    (root / "a-b" / "x").write_text("x")
    (root / "a" / "sub2").mkdir()
    files = list(walk_files(str(root)))
    assert len(files) == len(set(files)) == 16
    assert files == sorted(files, key=lambda p: p.split("/"))
    assert files.index("a/sub/two.dcm") < files.index("a-b/x")
    for k, cursor in enumerate(files):
        assert list(walk_files(str(root), after=cursor)) == files[k + 1 :]
    # A cursor that no longer exists resumes at the next path in the same order.
    first_in_sub = files.index("a/sub/two-header.dcm")
    assert files[first_in_sub + 1] == "a/sub/two.dcm"
    assert list(walk_files(str(root), after="a/sub/three.dcm")) == files[first_in_sub:]
    assert list(walk_files(str(root), after="a/sub")) == files[first_in_sub:]
    assert list(walk_files(str(root), after="zzz")) == []


def test_walk_skips_index_only_at_storage_root(plain_store: Store, tmp_path: Path) -> None:
    storage = _copy(plain_store, tmp_path / "store")
    # Not a hex name: the copied store holds random two-hex-digit folders.
    (storage / "zz").mkdir()
    (storage / "zz" / "index").write_text("a file that happens to be called index")
    files = list(walk_files(str(storage)))
    assert "index" not in files and "zz/index" in files
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "index").write_text("not sqlite")
    assert list(walk_files(str(tree))) == ["index"]


# --- inspect errors ----------------------------------------------------------------------


def test_inspect_errors_and_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such path"):
        inspect_path(str(tmp_path / "nope"))
    assert detect(str(tmp_path / "nope")).kind == "missing"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    report = inspect_path(str(tmp_path / "empty"))
    assert report["kind"] == "empty"
    assert report["advice"].startswith("nothing to import")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        try:
            with pytest.raises(PermissionError, match="permission denied"):
                inspect_path(str(locked))
        finally:
            locked.chmod(0o755)
