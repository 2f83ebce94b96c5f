"""`migrator import` end to end: storage folders written by a real Orthanc, sent to another."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import ledger_rows, run_cli, state_counts

from migrator.testkit import OrthancProcess, SyntheticInstance, make_dataset, upload_all
from migrator.testkit.dicomgen import orthanc_compressed, without_pixel_data

N = 12


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _build_store(workdir: Path, seed: int, **extra: object) -> tuple[Path, list[SyntheticInstance]]:
    instances = make_dataset(N, seed=seed)
    with OrthancProcess(workdir, extra=dict(extra)) as orthanc:
        upload_all(orthanc, instances)
    return orthanc.storage_dir, instances


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory):
    return _build_store(tmp_path_factory.mktemp("plain"), seed=21)


@pytest.fixture(scope="module")
def compressed_store(tmp_path_factory):
    return _build_store(tmp_path_factory.mktemp("compressed"), seed=22, StorageCompression=True)


def _assert_target_holds(target: OrthancProcess, expected: list[SyntheticInstance]) -> None:
    """Exactly these instances, byte-identical, each with its pixel data."""
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in expected)
    for inst in expected:
        stored = target.file(inst.orthanc_id)
        assert _md5(stored) == _md5(inst.data)
        assert "PixelData" in pydicom.dcmread(io.BytesIO(stored))


def test_import_plain_store_with_index(plain_store, orthanc_factory, ledger_path, ledger_url):
    storage, instances = plain_store
    target = orthanc_factory("target")
    result = run_cli("import", str(storage), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    _assert_target_holds(target, instances)
    assert state_counts(ledger_path) == {"sent": N}
    rows = ledger_rows(ledger_path, "SELECT path, md5, study_uid FROM instances")
    assert all(Path(path).is_file() and study for path, _, study in rows)
    assert sorted(md5 for _, md5, _ in rows) == sorted(_md5(i.data) for i in instances)


def test_import_compressed_store_with_index(
    compressed_store, orthanc_factory, ledger_path, ledger_url
):
    storage, instances = compressed_store
    target = orthanc_factory("target")
    result = run_cli("import", str(storage), target.url, "--ledger", ledger_url, "-c", "3")
    assert result.code == 0, result.stderr
    _assert_target_holds(target, instances)
    # Header-only attachments are never even listed: the index says what they are.
    assert state_counts(ledger_path) == {"sent": N}


def test_import_compressed_store_without_index(
    compressed_store, orthanc_factory, tmp_path, ledger_path, ledger_url
):
    storage = Path(shutil.copytree(compressed_store[0], tmp_path / "noindex"))
    (storage / "index").unlink()
    target = orthanc_factory("target")
    result = run_cli("import", str(storage), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    _assert_target_holds(target, compressed_store[1])
    assert state_counts(ledger_path) == {"sent": N, "skipped": N}
    reasons = ledger_rows(
        ledger_path,
        "SELECT last_error, COUNT(*) FROM instances WHERE state='skipped' GROUP BY last_error",
    )
    assert reasons == [("header-only copy (DicomUntilPixelData)", N)]


def test_import_mixed_folder(orthanc_factory, tmp_path, ledger_path, ledger_url):
    inst = make_dataset(6, seed=23)
    files = {
        "a/one.dcm": inst[0].data,
        "a/one-copy.dcm": inst[0].data,
        "a/two-header.dcm": without_pixel_data(inst[1].data),
        "a/z/two.dcm": inst[1].data,
        "b/three.dcm": inst[2].data,
        "b/truncated.dcm": inst[3].data[:-100],
        "c/4f/1a/4f1a0000-0000-4000-8000-000000000004": orthanc_compressed(inst[4].data),
        "summary.json": json.dumps({"0008,0018": {"Name": "SOPInstanceUID", "Value": "1"}}),
        "notes.txt": "not DICOM\n",
    }
    root = tmp_path / "mixed"
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    target = orthanc_factory("target")

    result = run_cli("import", str(root), target.url, "--ledger", ledger_url)
    # The truncated file reaches the target, which refuses it: the job is not all sent.
    assert result.code == 1, result.stderr
    _assert_target_holds(target, [inst[0], inst[1], inst[2], inst[4]])
    rows = dict(ledger_rows(ledger_path, "SELECT source_key, state FROM instances"))
    assert rows == {
        # Identical copies: the first in walk order ('-' sorts before '.') is sent.
        "a/one-copy.dcm": "sent",
        "a/one.dcm": "skipped",
        "a/two-header.dcm": "skipped",
        "a/z/two.dcm": "sent",
        "b/three.dcm": "sent",
        "b/truncated.dcm": "rejected",
        "c/4f/1a/4f1a0000-0000-4000-8000-000000000004": "sent",
        "summary.json": "skipped",
        "notes.txt": "skipped",
    }
    errors = dict(ledger_rows(ledger_path, "SELECT source_key, last_error FROM instances"))
    assert "Bad file format" in errors["b/truncated.dcm"]
    assert errors["summary.json"].startswith("JSON summary")
    assert errors["a/one.dcm"].startswith("superseded")

    status = json.loads(run_cli("status", "--json", "--ledger", ledger_url).stdout)
    assert status["jobs"][0]["counts"]["skipped"] == 4
    assert status["jobs"][0]["counts"]["failed"] == 0


def test_import_bad_paths(orthanc_factory, tmp_path, ledger_url):
    target = orthanc_factory("target")
    missing = run_cli("import", str(tmp_path / "nope"), target.url, "--ledger", ledger_url)
    assert missing.code == 2
    missing.assert_one_line_error()

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    (junk / "b.json").write_text("{}")
    nodicom = run_cli("import", str(junk), target.url, "--ledger", ledger_url)
    assert nodicom.code == 2
    nodicom.assert_one_line_error()
    assert "no DICOM" in nodicom.stderr
    assert target.count() == 0


def test_import_refuses_index_of_running_orthanc(orthanc_factory, ledger_path, ledger_url):
    source = orthanc_factory("running")
    upload_all(source, make_dataset(3, seed=24))
    target = orthanc_factory("target")
    result = run_cli("import", str(source.storage_dir), target.url, "--ledger", ledger_url)
    assert result.code == 3
    result.assert_one_line_error()
    assert "running" in result.stderr
    assert target.count() == 0


def test_inspect_reports_a_store(compressed_store):
    storage, _ = compressed_store
    result = run_cli("inspect", str(storage), "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "orthanc-index"
    assert report["instances"] == N
    assert report["advice"].startswith(f"migrator import {storage}")
    text = run_cli("inspect", str(storage))
    assert text.code == 0 and "migrator import" in text.stdout
