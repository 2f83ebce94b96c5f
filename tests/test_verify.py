"""`migrator verify` and `retry --state missing|differ` against real Orthanc processes."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import pytest
from conftest import ledger_rows, run_cli, start_cli, state_counts

from migrator.ledger.store import Ledger, Outcome
from migrator.states import State
from migrator.testkit import OrthancProcess, Proxy, make_dataset, make_instance, upload_all

N = 60


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One source Orthanc with N instances (6 studies), shared read-only by the module."""
    server = OrthancProcess(tmp_path_factory.mktemp("source"), name="source").start()
    data = make_dataset(N, studies=6, seed=41)
    upload_all(server, data)
    yield server, data
    server.stop(graceful=False)


def _verify(ledger_url: str, *args: str, env: dict[str, str] | None = None):
    result = run_cli("verify", "--ledger", ledger_url, "--json", *args, env=env)
    assert result.code in (0, 1), result.stderr
    (job,) = json.loads(result.stdout)["jobs"]
    return result.code, job


def _ids(job: dict, result: str) -> set[str]:
    return {p["orthanc_id"] for p in job["problems"][result]}


def test_verify_names_missing_and_differ_then_retry_restores(
    source, orthanc_factory, ledger_path, ledger_url
):
    src, data = source
    target = orthanc_factory("target")
    # The target already holds another version of one instance (same UIDs, other bytes):
    # replication answers AlreadyStored and counts it as sent.
    old = data[7]
    other = make_instance(old.patient_id, old.study_uid, old.series_uid, old.sop_uid, seed=999)
    assert target.upload(other)["ID"] == old.orthanc_id
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    assert state_counts(ledger_path) == {"sent": N}
    deleted = {data[i].orthanc_id for i in (0, 25, 59)}
    for orthanc_id in deleted:
        target.delete_instance(orthanc_id)

    code, job = _verify(ledger_url)
    assert code == 1
    assert (job["match"], job["missing"], job["differ"], job["error"]) == (N - 4, 3, 1, 0)
    assert _ids(job, "missing") == deleted
    assert _ids(job, "differ") == {old.orthanc_id}
    assert "AlreadyStored" in job["problems"]["differ"][0]["detail"]
    rows = dict(ledger_rows(ledger_path, "SELECT orthanc_id, verify_result FROM instances"))
    assert {i for i, r in rows.items() if r == "missing"} == deleted

    retried = run_cli("retry", "--state", "missing", "--ledger", ledger_url)
    assert retried.code == 0 and "3 rows (missing)" in retried.stdout
    assert state_counts(ledger_path) == {"sent": N - 3, "pending": 3}
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    code, job = _verify(ledger_url, "--max-age", "1h")
    # Only the three resent rows were asked again: the other matches are younger than 1h.
    assert code == 1 and job["checked"] == 3
    assert job["matched_before_pass"]["count"] == N - 4
    assert (job["missing"], job["differ"]) == (0, 1)

    # The differing one: resending only replaces it where the target allows overwrites.
    target.stop(graceful=False)
    target.extra["OverwriteInstances"] = True
    target.start()
    assert run_cli("retry", "--state", "differ", "--ledger", ledger_url).code == 0
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    code, job = _verify(ledger_url)
    assert code == 0, job
    assert (job["match"], job["missing"], job["differ"], job["error"]) == (N, 0, 0, 0)
    assert hashlib.md5(target.file(old.orthanc_id)).hexdigest() == hashlib.md5(old.data).hexdigest()


def test_verify_catches_storage_recycling(source, orthanc_factory, ledger_path, ledger_url):
    """Orthanc 1.10 with MaximumPatientCount deletes older patients and still answers
    Success: the replication looks complete, verify must not."""
    src, data = source
    target = orthanc_factory("target", extra={"MaximumPatientCount": 1})
    result = run_cli("replicate", src.url, target.url, "--ledger", ledger_url, "-c", "1")
    assert result.code == 0, result.stderr
    assert state_counts(ledger_path) == {"sent": N}
    kept = set(target.instance_ids())
    assert 0 < len(kept) < N
    code, job = _verify(ledger_url)
    assert code == 1
    assert _ids(job, "missing") == {d.orthanc_id for d in data} - kept
    assert job["match"] == len(kept)


def test_verify_resumes_after_kill_and_all_reasks(source, orthanc_factory, ledger_path, ledger_url):
    src, data = source
    target = orthanc_factory("target")
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    with Proxy("127.0.0.1", target.http_port, delay=0.02) as proxy:
        args = ("verify", "--ledger", ledger_url, "--target-url", proxy.url, "-c", "1")
        proc = start_cli(*args)
        verified = 0
        deadline = time.monotonic() + 30
        while verified < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
            sql = "SELECT COUNT(*) FROM instances WHERE verified_at IS NOT NULL"
            verified = ledger_rows(ledger_path, sql)[0][0]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        verified = ledger_rows(ledger_path, sql)[0][0]
        assert 10 <= verified < N
        proxy.reset_counts()
        done = run_cli(*args)
        assert done.code == 0, done.stdout + done.stderr
        asked = {p.split("/")[2] for m, p in proxy.requests() if p.endswith("/md5")}
    # The rerun asked exactly the rows the killed pass had not recorded.
    unverified = {
        r[0]
        for r in ledger_rows(ledger_path, "SELECT orthanc_id FROM instances")
        if r[0] not in asked
    }
    assert len(asked) == N - verified and len(unverified) == verified

    # An instance dropped after it was verified is seen by the next pass.
    target.delete_instance(data[3].orthanc_id)
    code, job = _verify(ledger_url, "--all")
    assert code == 1 and job["checked"] == N
    assert _ids(job, "missing") == {data[3].orthanc_id}
    # --since trusts the checks made after that time: they are not asked again.
    code, job = _verify(ledger_url, "--since", str(time.time() - 3600))
    assert job["checked"] == 0 and job["missing"] == 1


def test_verify_counts_per_study(orthanc_factory, tmp_path: Path, ledger_path, ledger_url):
    """An import records StudyInstanceUIDs: verify compares the counts per study."""
    data = make_dataset(24, studies=3, seed=43)
    folder = tmp_path / "files"
    for i, inst in enumerate(data):
        path = folder / f"{i // 8}" / f"{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(inst.data)
    target = orthanc_factory("target")
    assert run_cli("import", str(folder), target.url, "--ledger", ledger_url).code == 0
    target.delete_instance(data[0].orthanc_id)
    first = data[0]
    extra = make_instance(first.patient_id, data[9].study_uid, data[9].series_uid, "1.2.3.99.1")
    target.upload(extra)  # same patient and study as data[9], not part of the job

    code, job = _verify(ledger_url)
    assert code == 1
    studies = job["studies"]
    assert studies["checked"] == 3 and studies["skipped_rows"] == 0
    assert studies["fewer"] == [{"study_uid": first.study_uid, "sent": 8, "target": 7}]
    assert studies["more"] == [{"study_uid": data[9].study_uid, "sent": 8, "target": 9}]
    assert _ids(job, "missing") == {first.orthanc_id}
    text = run_cli("verify", "--ledger", ledger_url)
    assert text.code == 1
    assert "23 match, 1 missing, 0 differ, 0 error" in text.stdout
    assert f"missing (1):\n  {first.orthanc_id}  0/0.dcm\n" in text.stdout
    assert f"study {first.study_uid}: sent 8, target holds 7" in text.stdout


def test_verify_target_refusing_or_unreachable(orthanc_factory, ledger_url):
    target = orthanc_factory("target", users={"alice": "s3cret"})
    data = make_dataset(3, seed=44)
    upload_all(target, data)
    # A job as `replicate http://alice:s3cret@...` leaves it: the URL stored without the
    # password (verify with MIGRATOR_TARGET_PASSWORD is exercised in test_report.py).
    ledger = Ledger.open(ledger_url, create=True)
    try:
        display = target.url.replace("http://", "http://alice@")
        job = ledger.ensure_job("j", "replicate", "http://source:8042/", display, {})
        rows = [{"source_key": d.orthanc_id, "orthanc_id": d.orthanc_id} for d in data]
        ledger.save_listing(job.id, rows, None, done=True)
        leases = ledger.lease(job.id, "me", 3, 60)
        md5 = hashlib.md5(data[0].data).hexdigest()
        ledger.record("me", [Outcome(le.id, State.SENT, "Success", md5=md5) for le in leases])
    finally:
        ledger.close()
    refused = run_cli("verify", "--ledger", ledger_url)
    assert refused.code == 3
    refused.assert_one_line_error()
    assert "refused the credentials" in refused.stderr

    target.stop(graceful=False)
    down = run_cli("verify", "--ledger", ledger_url, "--target-url", target.url)
    assert down.code == 3
    down.assert_one_line_error()
    assert "unreachable" in down.stderr

    bad = run_cli("retry", "--state", "match", "--ledger", ledger_url)
    assert bad.code == 2
    bad.assert_one_line_error()
