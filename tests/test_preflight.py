"""Preflight of the target: loud warnings when it will not keep what it receives.

Unit tests on `GET /system` answers shaped like each Orthanc version's, then real
Orthanc 1.10.1 processes: its real answer (which reports none of the storage limits), and
a target with MaximumPatientCount = 1 that shows why the warning matters: it answers
Success for every instance and silently deletes the oldest patient.
"""

from __future__ import annotations

from conftest import ledger_rows
from faultkit import fast_fill, invoke

from migrator.ends.orthanc.preflight import check_target

V1_10 = {"ApiVersion": 16, "DatabaseVersion": 6, "Name": "t", "Version": "1.10.1"}
V1_11_3 = {
    **V1_10, "Version": "1.11.3", "IngestTranscoding": "", "OverwriteInstances": False,
    "StorageCompression": False, "MaximumStorageSize": 0, "MaximumStorageMode": "Recycle",
}  # fmt: skip
V1_12_4 = {**V1_11_3, "Version": "1.12.4", "MaximumPatientCount": 0}


def _dangers(system: dict) -> list[str]:
    return [f.message for f in check_target(system) if f.danger]


def test_a_safe_recent_target_has_no_findings():
    assert check_target(V1_12_4) == []


def test_unreported_limits_must_be_checked_by_hand():
    (old,) = _dangers(V1_10)
    assert "1.10.1 does not report MaximumStorageSize and MaximumPatientCount" in old
    assert "make sure they are 0" in old
    (middle,) = _dangers(V1_11_3)
    assert "does not report MaximumPatientCount" in middle
    assert "MaximumStorageSize and" not in middle


def test_recycling_target_is_a_danger():
    (size,) = _dangers({**V1_12_4, "MaximumStorageSize": 1000})
    assert "RECYCLES: MaximumStorageSize=1000 MB" in size
    assert "Set MaximumStorageSize and MaximumPatientCount to 0" in size
    (both,) = _dangers({**V1_12_4, "MaximumStorageSize": 10, "MaximumPatientCount": 5})
    assert "MaximumStorageSize=10 MB, MaximumPatientCount=5" in both


def test_rejecting_target_is_only_noted():
    findings = check_target({**V1_12_4, "MaximumPatientCount": 5, "MaximumStorageMode": "Reject"})
    assert [f.danger for f in findings] == [False]
    assert "refuses instances and the run stops" in findings[0].message


def test_transcoding_and_overwriting_targets_are_dangers():
    (transcode,) = _dangers({**V1_12_4, "IngestTranscoding": "1.2.840.10008.1.2.4.70"})
    assert "TRANSCODES" in transcode and "Remove IngestTranscoding" in transcode
    (overwrite,) = _dangers({**V1_12_4, "OverwriteInstances": True})
    assert "OVERWRITES" in overwrite and "OverwriteInstances to false" in overwrite


def test_odd_values_do_not_crash():
    assert check_target({}) != []
    assert _dangers({**V1_12_4, "MaximumStorageSize": "junk", "OverwriteInstances": "yes"}) == []


def test_real_1_10_target_gets_the_warning(source_target, ledger_url):
    source, target = source_target
    fast_fill(source, 3, seed=51)
    result = invoke("replicate", source.url, target.url, "--ledger", ledger_url, "--dry-run")
    assert result.code == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "PREFLIGHT" in line]
    assert "WARNING" in line and target.url in line
    assert "does not report MaximumStorageSize and MaximumPatientCount" in line


def test_why_it_matters_a_recycling_target_loses_data(orthanc_factory, ledger_path, ledger_url):
    source = orthanc_factory("source")
    data = fast_fill(source, 80, seed=52)  # two patients of 40 instances
    assert len({d.patient_id for d in data}) == 2
    target = orthanc_factory("target", extra={"MaximumPatientCount": 1})
    result = invoke("replicate", source.url, target.url, "--ledger", ledger_url, "-c", "1")
    assert result.code == 0, result.stderr
    assert "PREFLIGHT" in result.stderr  # the operator was told to check this setting
    # Every instance was answered Success, yet the first patient is gone from the target.
    assert ledger_rows(ledger_path, "SELECT state, COUNT(*) FROM instances GROUP BY state") == [
        ("sent", 80)
    ]
    assert target.count() < 80
    with target.client() as http:
        assert len(http.get("patients").json()) == 1
