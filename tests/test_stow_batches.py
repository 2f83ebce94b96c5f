"""Batched STOW-RS from the engine: several instances per request into a DICOMweb
target (a real Orthanc with Debian's DICOMweb plugin), each row with its own outcome."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ledger_rows
from faultkit import fast_fill, invoke, md5_of
from test_batching import corrupt

from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.faults import Status
from migrator.testkit.proxy import Proxy

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB = {"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
STOW = "/dicom-web/studies"
QUERY = "SELECT path, state FROM instances"

pytestmark = pytest.mark.skipif(
    not os.path.exists(PLUGIN) and not os.environ.get("CI"),
    reason="Debian's orthanc-dicomweb plugin is not installed",
)


def test_stow_batch_with_a_refused_and_good_instances(orthanc_factory, tmp_path, ledger_path):
    data = fast_dataset(8, seed=61)
    folder = tmp_path / "dicom"
    folder.mkdir()
    for i, inst in enumerate(data):
        # The fourth file's header reads fine (listed, identified) but Orthanc refuses it.
        (folder / f"{i}.dcm").write_bytes(corrupt(inst.data) if i == 3 else inst.data)
    target = orthanc_factory("target", extra=DICOMWEB)
    with Proxy("127.0.0.1", target.http_port) as tgt:
        result = invoke("import", str(folder), "dicomweb+" + tgt.url + "dicom-web",
                        "--ledger", f"sqlite:///{ledger_path}", "-c", "1",
                        "--batch", "8")  # fmt: skip
        # One request for the batch of 8, and the refused file once more alone (its
        # verdict is about it only); one STOW-RS per instance would be 8.
        assert tgt.count("POST", STOW) == 2, tgt.count("POST", STOW)
    assert result.code != 0  # a rejected row: not everything is on the target
    states = {Path(p).name: s for p, s in ledger_rows(ledger_path, QUERY)}
    assert states == {f"{i}.dcm": "rejected" if i == 3 else "sent" for i in range(8)}
    rejected = ledger_rows(ledger_path, "SELECT last_error FROM instances WHERE state='rejected'")
    assert "STOW-RS" in rejected[0][0], rejected
    good = [d for i, d in enumerate(data) if i != 3]
    md5s = dict(
        ledger_rows(ledger_path, "SELECT orthanc_id, md5 FROM instances WHERE state='sent'")
    )
    assert md5s == {d.orthanc_id: md5_of(d.data) for d in good}
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in good)
    assert {target.md5(d.orthanc_id) for d in good} == {md5_of(d.data) for d in good}


def test_failed_stow_batch_is_retried_whole(orthanc_factory, ledger_path):
    source = orthanc_factory("source")
    data = fast_fill(source, 16, seed=62)
    target = orthanc_factory("target", extra=DICOMWEB)
    with Proxy("127.0.0.1", target.http_port) as tgt:
        # The first STOW-RS request answers 503: its 8 rows are retried, none refused.
        failed: list[str] = []

        def first_post_fails(method: str, path: str, index: int) -> Status | None:
            if method == "POST" and not failed:
                failed.append(path)
                return Status(503)
            return None

        tgt.set_faults(first_post_fails)
        result = invoke("replicate", source.url, "dicomweb+" + tgt.url + "dicom-web",
                        "--ledger", f"sqlite:///{ledger_path}", "-c", "1",
                        "--batch", "8")  # fmt: skip
        posts = tgt.count("POST", STOW)
    assert result.code == 0, result.stderr[-2000:]
    # Two batches of 8, then the 8 rows of the failed one again (as their backoffs
    # come due: alone or together).
    assert 3 <= posts <= 10, posts
    assert ledger_rows(ledger_path, "SELECT state, COUNT(*) FROM instances GROUP BY state") == [
        ("sent", 16)
    ]
    retried = ledger_rows(ledger_path, "SELECT COUNT(*) FROM instances WHERE attempts > 1")[0][0]
    assert retried == 8, retried
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)


def test_batch_one_sends_one_instance_per_stow(orthanc_factory, ledger_path):
    source = orthanc_factory("source")
    data = fast_fill(source, 12, seed=63)
    target = orthanc_factory("target", extra=DICOMWEB)
    with Proxy("127.0.0.1", target.http_port, delay=0.01) as tgt:
        result = invoke("replicate", source.url, "dicomweb+" + tgt.url + "dicom-web",
                        "--ledger", f"sqlite:///{ledger_path}", "-c", "8", "--fixed",
                        "--batch", "1")  # fmt: skip
        # Neither the engine's batches nor stores arriving together share a request.
        assert tgt.count("POST", STOW) == 12, tgt.count("POST", STOW)
    assert result.code == 0, result.stderr[-2000:]
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)
