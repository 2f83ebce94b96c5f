"""A folder import never loses a DICOM file the target would store, whatever its encoding.

The folder is written by hand (tests/dicomforge.py): datasets in every uncompressed
transfer syntax, with and without preamble and file meta information, with oddities (odd
lengths, private sequences, missing elements, elements out of order, padding), truncated
at every element, next to files that are not DICOM. Orthanc's own sample
``ImportDicomFiles.py`` (Debian's orthanc-doc) posts every file of the folder to one fresh
Orthanc, ``migrator import`` to another: migrator must get in at least the instances the
sample gets in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ledger_rows, run_cli
from dicomforge import (
    EXPLICIT_BE,
    IMPLICIT_LE,
    NOT_STORABLE,
    Made,
    build_folder,
    encode_file,
    instance,
)

from migrator.ends.folder.fileclass import classify_file
from migrator.errors import Kind, Verdict, refused_as_not_dicom
from migrator.testkit import OrthancProcess

IMPORT_SAMPLE = Path(
    os.environ.get(
        "MIGRATOR_IMPORT_SAMPLE",
        "/usr/share/doc/orthanc/Samples/ImportDicomFiles/ImportDicomFiles.py",
    )
)

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(os.environ.get("MIGRATOR_ORTHANC_BIN", "/usr/sbin/Orthanc")),
        reason="Orthanc binary not installed",
    ),
]


def _import_sample(server: OrthancProcess, folder: Path) -> str:
    """Run Orthanc's ImportDicomFiles.py on ``folder`` against ``server``."""
    if not IMPORT_SAMPLE.exists():
        pytest.fail(f"{IMPORT_SAMPLE} is missing: install Debian's orthanc-doc")
    proc = subprocess.run(
        [sys.executable, str(IMPORT_SAMPLE), "127.0.0.1", str(server.http_port), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_no_preamble_no_meta_in_every_syntax_is_dicom(tmp_path: Path) -> None:
    """Datasets written without preamble and file meta, in each uncompressed transfer
    syntax, are classified as DICOM with the Orthanc ID of their four identifiers."""
    for n, syntax in enumerate((IMPLICIT_LE, "1.2.840.10008.1.2.1", EXPLICIT_BE), start=1):
        spec = instance(n, syntax != EXPLICIT_BE)
        path = tmp_path / f"file{n}"
        path.write_bytes(encode_file(spec.elements, syntax, "raw", spec.sop))
        cand = classify_file(str(path))
        assert cand.skip_reason is None, (syntax, cand.skip_reason)
        assert cand.undecided is None
        assert cand.orthanc_id == spec.orthanc_id
        assert cand.has_pixels is True


def test_target_verdict_on_unidentified_files() -> None:
    """The target's "not DICOM" and "no identifiers" settle an unidentified file as
    skipped; any other refusal does not."""
    bad = Verdict(Kind.PERMANENT, "HTTP 400: Bad file format: Cannot parse", 400)
    no_tag = Verdict(Kind.PERMANENT, "HTTP 404: Inexistent tag", 404)
    assert (refused_as_not_dicom(bad) or "").startswith("not DICOM: the target could not")
    assert (refused_as_not_dicom(no_tag) or "").startswith("incomplete DICOM")
    assert refused_as_not_dicom(Verdict(Kind.PERMANENT, "FilteredOut: refused")) is None
    assert refused_as_not_dicom(Verdict(Kind.RETRYABLE, "HTTP 400: Bad file format")) is None


def test_folder_import_gets_in_what_import_dicom_files_gets_in(
    tmp_path: Path,
    orthanc_factory: Callable[..., OrthancProcess],
    ledger_path: Path,
    ledger_url: str,
) -> None:
    folder = tmp_path / "folder"
    made = {m.name: m for m in build_folder(folder)}
    reference, target = orthanc_factory("reference"), orthanc_factory("target")

    _import_sample(reference, folder)
    result = run_cli("import", str(folder), target.url, "--ledger", ledger_url, "-c", "4")
    assert "Traceback" not in result.stderr

    by_sample = set(reference.instance_ids())
    by_migrator = set(target.instance_ids())
    missing = by_sample - by_migrator
    assert not missing, f"{len(missing)} instances ImportDicomFiles.py got in are missing"
    # The folder holds them all: a sample run that stored nothing would prove nothing.
    assert len(by_sample) >= 120

    rows = {
        key: (state, oid, target_id, error or "")
        for key, state, oid, target_id, error in ledger_rows(
            ledger_path,
            "SELECT source_key, state, orthanc_id, target_id, last_error FROM instances",
        )
    }
    assert set(rows) == set(made)
    for name, m in made.items():
        state, oid, target_id, error = rows[name]
        _check_row(m, state, oid, target_id, error, by_migrator)

    # Rows end rejected only where the target refused a file known to be DICOM, and
    # ImportDicomFiles.py could not get those in either.
    rejected = {k for k, row in rows.items() if row[0] == "rejected"}
    assert {made[k].kind for k in rejected} <= {"truncated", "deflated-raw"}
    assert result.code == 1, result.stderr  # rejected rows: the run is not complete

    # Every sent row is on the target as sent (the rejected ones keep verify's verdict
    # "not complete").
    verify = run_cli("verify", "--ledger", ledger_url)
    sent = sum(1 for row in rows.values() if row[0] == "sent")
    assert f"{sent} match, 0 missing, 0 differ, 0 error" in verify.stdout, verify.stdout


def _check_row(
    m: Made, state: str, oid: str | None, target_id: str | None, error: str, on_target: set[str]
) -> None:
    """What the ledger must say about one file of the folder."""
    where = f"{m.name}: {state} {error}"
    if m.kind == "dicom" or (m.kind.startswith("odd:") and m.kind[4:] not in NOT_STORABLE):
        # Every encoding and oddity: sent, under the ID Orthanc gives it.
        assert state == "sent", where
        assert oid == m.orthanc_id and target_id is None, where
        assert m.orthanc_id in on_target, where
    elif m.kind.startswith("odd:"):
        # Without one of the UIDs: offered, and the target's answer recorded.
        assert state == "skipped", where
        assert error.startswith("incomplete DICOM: the target found no identifiers"), where
    elif m.kind == "deflated-raw":
        assert oid == m.orthanc_id, where
        assert state == "rejected" and "Bad file format" in error, where
    elif m.kind == "unreadable":
        # Not identified before sending; the target stored it and its ID is recorded.
        assert state == "sent" and oid is None, where
        assert target_id == m.orthanc_id and m.orthanc_id in on_target, where
    elif m.kind == "garbage":
        assert state == "skipped", where
        assert error.startswith("not DICOM: the target could not parse it"), where
    elif m.kind == "other":
        assert state == "skipped" and error, where
        assert error.startswith(("not DICOM", "JSON summary", "empty file")), where
    else:
        assert m.kind == "truncated", where
        assert state in ("sent", "rejected", "skipped"), where
        if state == "sent":
            assert (target_id or oid) in on_target, where
