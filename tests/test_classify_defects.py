"""Classification of files and Orthanc IDs against real Orthanc 1.10.1 processes: valid
instances that look like something else, identifiers Orthanc hashes its own way, folders
the user may not read, and `inspect` on stores that changed their settings over time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import ledger_rows, run_cli

from migrator.ends.dicomid import orthanc_id_from_dataset
from migrator.ends.folder.dicomhead import read_header
from migrator.ends.folder.fileclass import (
    HELD_REASONS,
    HELD_STORAGE,
    HELD_TREE,
    SKIP_HEADER_ONLY,
    SKIP_NO_PIXELS,
    _pydicom_header,
    classify_file,
)
from migrator.ends.folder.inspect import ORPHAN_ADVICE, inspect_path, render_text
from migrator.ledger.store import Ledger
from migrator.testkit import OrthancProcess, make_dataset, make_instance, upload_all
from migrator.testkit.dicomgen import without_pixel_data
from migrator.testkit.fastgen import fast_dataset

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.environ.get("MIGRATOR_ORTHANC_BIN", "/usr/sbin/Orthanc")),
    reason="Orthanc binary not installed",
)

ROOT = Path(__file__).resolve().parent.parent


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _brace_preamble(data: bytes) -> bytes:
    """A Part-10 file whose free-form 128-byte preamble starts with "{"."""
    assert data[128:132] == b"DICM"
    return b'{"x": 1}' + b"\x00" * 120 + data[128:]


def _instance(n: int, patient: str = "CLASSIFY") -> bytes:
    study = f"1.2.826.0.1.3680043.10.1.{n}"
    return make_instance(patient, study, f"{study}.1", f"{study}.1.1", seed=n)


def _orthanc_id(data: bytes) -> str:
    return orthanc_id_from_dataset(pydicom.dcmread(io.BytesIO(data)))


# --- valid instances that looked like header-only copies or JSON ---------------------


# Files listed between a copy without pixels and the full copy of its instance: enough to
# fill several listing pages, so that the first copy could be leased (and sent) before the
# full one is even listed.
FILLERS = 400


def test_bare_folder_sends_no_pixel_instance_and_brace_preamble(
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    ledger_path: Path,
    ledger_url: str,
) -> None:
    spectro = without_pixel_data(_instance(1))
    brace = _brace_preamble(_instance(2))
    full = _instance(3)
    files = {
        "spectro.dcm": spectro,
        "brace.dcm": brace,
        # A copy without pixels listed well before the full copy of its instance: it
        # must neither be sent first (the full copy would be "AlreadyStored") nor at all.
        "a-nopix.dcm": without_pixel_data(full),
        **{f"m/{i:04d}.dcm": inst.data for i, inst in enumerate(fast_dataset(FILLERS, seed=5))},
        "z/full.dcm": full,
    }
    root = tmp_path / "bare"
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)

    target = orthanc_factory("target")
    result = run_cli("import", str(root), target.url, "--ledger", ledger_url, "-c", "4")
    assert result.code == 0, result.stderr
    assert target.count() == 3 + FILLERS
    for data in (spectro, brace, full):
        # Byte-identical, so the full copy (with its pixels) is the one the target holds.
        assert _md5(target.file(_orthanc_id(data))) == _md5(data)
    rows = dict(ledger_rows(ledger_path, "SELECT source_key, last_error FROM instances"))
    assert rows["a-nopix.dcm"] == SKIP_NO_PIXELS
    verify = run_cli("verify", "--ledger", ledger_url)
    assert verify.code == 0, verify.stdout + verify.stderr

    assert classify_file(str(root / "brace.dcm")).skip_reason is None
    report = inspect_path(str(root))
    assert report["dicom_files"] == 3 + FILLERS
    assert (report["header_only"], report["no_pixel_instances"]) == (1, 1)
    assert "header-only" not in render_text(report)


def test_storage_without_index_sends_lone_no_pixel_instance(
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    ledger_path: Path,
    ledger_url: str,
) -> None:
    instances = make_dataset(3, seed=61)
    spectro = without_pixel_data(_instance(4))
    with OrthancProcess(tmp_path / "old", extra={"StorageCompression": True}) as old:
        upload_all(old, instances)
        upload_all(old, fast_dataset(FILLERS, seed=6))
        old.upload(spectro)
    storage = Path(shutil.copytree(old.storage_dir, tmp_path / "noindex"))
    for name in ("index", "index-wal", "index-shm"):
        (storage / name).unlink(missing_ok=True)
    # 1.10.1 writes a header-only copy (DicomUntilPixelData) beside each image only.
    files = [p for p in storage.rglob("*") if p.is_file()]
    assert len(files) == 2 * (3 + FILLERS) + 1
    # Renamed so that the walk meets one header-only copy first and its full copy last.
    first = instances[0].orthanc_id
    for path in files:
        cand = classify_file(str(path))
        if cand.orthanc_id == first:
            digit = "f" if cand.has_pixels else "0"
            moved = storage / (digit * 2) / (digit * 2) / f"{digit * 8}-0000-4000-8000-{'0' * 12}"
            moved.parent.mkdir(parents=True, exist_ok=True)
            path.rename(moved)

    target = orthanc_factory("target")
    result = run_cli("import", str(storage), target.url, "--ledger", ledger_url, "-c", "4")
    assert result.code == 0, result.stderr
    assert target.count() == 3 + FILLERS + 1
    for data in [i.data for i in instances] + [spectro]:
        assert _md5(target.file(_orthanc_id(data))) == _md5(data)
    skipped = ledger_rows(
        ledger_path,
        "SELECT last_error, COUNT(*) FROM instances WHERE state = 'skipped' GROUP BY 1",
    )
    assert skipped == [(SKIP_HEADER_ONLY, 3 + FILLERS)]
    # The header-only copies stay out of `retry --state skipped`.
    retry = run_cli("retry", "--ledger", ledger_url, "--state", "skipped")
    assert retry.code == 0, retry.stderr
    rerun = run_cli("import", str(storage), target.url, "--ledger", ledger_url)
    assert rerun.code == 0, rerun.stderr
    assert _md5(target.file(first)) == _md5(instances[0].data)

    report = inspect_path(str(storage))
    assert (report["header_only"], report["no_pixel_instances"]) == (3 + FILLERS, 1)
    assert "header-only copies" in render_text(report)


# --- Orthanc IDs of multi-valued and padded identifiers ------------------------------

ODD_IDS = [
    ("A\\B", "1.2.3.20", "1.2.3.20.1", "1.2.3.20.1.1"),
    ("A \\B ", "1.2.3.21", "1.2.3.21.1", "1.2.3.21.1.1"),
    (" A\\ B", "1.2.3.22", "1.2.3.22.1", "1.2.3.22.1.1"),
    ("A\\", "1.2.3.23", "1.2.3.23.1", "1.2.3.23.1.1"),
    ("A\\B\\C", "1.2.3.24\\1.2.3.25", "1.2.3.24.1", "1.2.3.24.1.1"),
    ("P", "1.2.3.26", "1.2.3.26.1", "1.2.3.26.1.1\\1.2.3.26.1.2"),
]


def test_orthanc_id_of_multi_valued_identifiers(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_url: str
) -> None:
    source = orthanc_factory("source")
    root = tmp_path / "odd"
    root.mkdir()
    expected = {}
    for n, ids in enumerate(ODD_IDS):
        data = make_instance(*ids, seed=n)
        answer = source.upload(data)
        expected[answer["ID"]] = data
        path = root / f"{n}.dcm"
        path.write_bytes(data)
        # The fast reader, pydicom's path and a parsed dataset: all as Orthanc hashes.
        assert classify_file(str(path)).orthanc_id == answer["ID"], ids
        assert read_header(data).patient_id == _pydicom_header(data, force=False).patient_id
        assert read_header(data).sop_uid == _pydicom_header(data, force=False).sop_uid
        assert orthanc_id_from_dataset(pydicom.dcmread(io.BytesIO(data))) == answer["ID"]

    # End to end: imported rows carry the target's IDs, so verify finds every instance.
    target = orthanc_factory("target")
    result = run_cli("import", str(root), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    assert sorted(target.instance_ids()) == sorted(expected)
    verify = run_cli("verify", "--ledger", ledger_url, "--json")
    assert verify.code == 0, verify.stdout + verify.stderr


# --- permission denied is not "no such path" -----------------------------------------


def _as_nobody(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MIGRATOR_PROGRESS": "none", "HOME": str(cwd)}
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    cmd += [sys.executable, "-m", "migrator", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_unreadable_storage_says_permission_denied(
    orthanc_factory: Callable[..., OrthancProcess],
) -> None:
    # Outside pytest's own 0700 folder, so that the unprivileged user can get this far.
    base = Path(tempfile.mkdtemp(prefix="migrator-perm-"))
    try:
        base.chmod(0o755)
        # As Debian keeps it: /var/lib/orthanc (0750, another owner) holding db-v6/.
        locked = base / "orthanc"
        (locked / "db-v6").mkdir(parents=True)
        (locked / "db-v6" / "f.dcm").write_bytes(_instance(5))
        locked.chmod(0o700)
        work = base / "work"
        work.mkdir()
        work.chmod(0o777)
        target = orthanc_factory("target")
        ledger = f"sqlite:///{work / 'ledger.db'}"
        for folder in (locked, locked / "db-v6"):
            inspect = _as_nobody("inspect", str(folder), cwd=work)
            assert inspect.returncode == 2, inspect.stderr
            assert "permission denied; run as a user who can read it" in inspect.stderr
            assert "no such" not in inspect.stderr
            imported = _as_nobody("import", str(folder), target.url, "--ledger", ledger, cwd=work)
            assert imported.returncode == 2, imported.stderr
            assert "permission denied; run as a user who can read it" in imported.stderr
            assert "no such" not in imported.stderr and "Traceback" not in imported.stderr
    finally:
        shutil.rmtree(base)


# --- inspect on a store that changed its compression -----------------------------------


def test_inspect_mixed_compression_and_other_files(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_url: str
) -> None:
    plain, packed = make_dataset(3, seed=71), make_dataset(2, seed=72)
    orthanc = OrthancProcess(tmp_path / "mixed", extra={"StorageCompression": False})
    with orthanc:
        upload_all(orthanc, plain)
    orthanc.extra["StorageCompression"] = True
    with orthanc:
        upload_all(orthanc, packed)
    storage = orthanc.storage_dir
    (storage / "ab" / "cd").mkdir(parents=True)
    (storage / "ab" / "cd" / "notes.txt").write_text("moved here by hand\n")
    # An orphan: a copy of a stored file under a uuid the index does not know.
    first = next(p for p in sorted(storage.rglob("*-*-*-*-*")) if p.is_file())
    orphan = storage / "01" / "23" / "0123abcd-0000-4000-8000-000000000000"
    orphan.parent.mkdir(parents=True)
    shutil.copy(first, orphan)

    report = inspect_path(str(storage))
    assert report["kind"] == "orthanc-index"
    # Compressed: the DICOM files and header-only copies written after the switch.
    assert (report["compressed_files"], report["plain_files"]) == (2 * 2, 3)
    assert report["other_files"] == 1 and report["other_examples"] == ["ab/cd/notes.txt"]
    assert report["orphan_files"] == 1
    text = render_text(report)
    assert "mixed: 4 files compressed, 3 plain" in text
    assert "ab/cd/notes.txt" in text
    assert "stored compressed" not in text
    assert "without its index" not in text and ORPHAN_ADVICE in text
    # One advice about orphans: the import's reason and the README say the same.
    assert "retry --state skipped --error orphan" in ORPHAN_ADVICE
    assert "retry --state skipped --error\n     orphan" in (ROOT / "README.md").read_text()
    assert json.loads(json.dumps(report)) == report

    # And the import sends every instance of the mixed store, byte for byte.
    target = orthanc_factory("target")
    result = run_cli("import", str(storage), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    for inst in plain + packed:
        assert _md5(target.file(inst.orthanc_id)) == _md5(inst.data)


# --- the settling of held files, on both ledgers -------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_settle_held_copies(dialect: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (
        request.getfixturevalue("pg_url")
        if dialect == "postgresql"
        else f"sqlite:///{tmp_path}/l.db"
    )
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job("held", "import", "/data", "http://t/", {})

        def row(key: str, orthanc_id: str, pixels: bool, skip: str | None = None) -> dict:
            return {
                "source_key": key,
                "orthanc_id": orthanc_id,
                "has_pixels": pixels,
                "skip_reason": skip,
                "path": key,
                "size": 1,
            }

        rows = [
            row("aa/bb/header", "I1", False, HELD_STORAGE),
            row("aa/bb/full", "I1", True),
            row("spectro.dcm", "I2", False, HELD_TREE),
            row("nopix.dcm", "I3", False, HELD_TREE),
            row("z/full.dcm", "I3", True),
        ]
        ledger.save_listing(job.id, rows, None, done=True)
        assert ledger.settle_held_copies(job.id, HELD_REASONS) == 1
        with ledger.engine.connect() as conn:
            got = dict(
                (key, (state, error))
                for key, state, error in conn.exec_driver_sql(
                    "SELECT source_key, state, last_error FROM instances"
                )
            )
        assert got == {
            "aa/bb/header": ("skipped", SKIP_HEADER_ONLY),
            "aa/bb/full": ("pending", None),
            "spectro.dcm": ("pending", None),
            "nopix.dcm": ("skipped", SKIP_NO_PIXELS),
            "z/full.dcm": ("pending", None),
        }
        # Settled once: a second call (a resumed run) changes nothing.
        assert ledger.settle_held_copies(job.id, HELD_REASONS) == 0
    finally:
        ledger.close()
