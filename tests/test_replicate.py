"""Replication end to end: the CLI in a subprocess against real Orthanc processes."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

from conftest import fill, ledger_rows, run_cli, start_cli, state_counts, wait_for_sent

from migrator.testkit.proxy import Proxy


def _md5s(server, ids):
    return {i: hashlib.md5(server.file(i)).hexdigest() for i in ids}


def test_full_replication(source_target, ledger_path, ledger_url):
    source, target = source_target
    data = fill(source, 60)
    result = run_cli("replicate", source.url, target.url, "--ledger", ledger_url, "-c", "4")
    assert result.code == 0, result.stderr
    ids = sorted(d.orthanc_id for d in data)
    assert sorted(target.instance_ids()) == ids
    originals = {d.orthanc_id: hashlib.md5(d.data).hexdigest() for d in data}
    assert _md5s(target, ids) == originals
    assert state_counts(ledger_path) == {"sent": 60}
    # The ledger recorded the MD5 of the bytes it sent and Orthanc's answer.
    rows = ledger_rows(ledger_path, "SELECT orthanc_id, md5, target_status FROM instances")
    assert {r[0]: r[1] for r in rows} == originals
    assert {r[2] for r in rows} == {"Success"}

    status = run_cli("status", "--json", "--ledger", ledger_url)
    assert status.code == 0
    doc = json.loads(status.stdout)
    (job,) = doc["jobs"]
    assert job["counts"]["sent"] == 60
    assert set(job["counts"]) >= {
        "pending",
        "in_flight",
        "sent",
        "rejected",
        "failed",
        "skipped",
        "vanished",
    }
    assert job["bytes_sent"] == sum(len(d.data) for d in data)

    # A rerun of the same command resumes the same job and sends nothing again.
    again = run_cli("replicate", source.url, target.url, "--ledger", ledger_url)
    assert again.code == 0
    assert "sent 0 " in again.stdout
    assert state_counts(ledger_path) == {"sent": 60}


def test_dry_run_fills_ledger_sends_nothing(source_target, ledger_path, ledger_url):
    source, target = source_target
    fill(source, 25)
    result = run_cli("replicate", source.url, target.url, "--ledger", ledger_url, "--dry-run")
    assert result.code == 0, result.stderr
    assert "25 instances would be sent" in result.stdout
    assert target.count() == 0
    assert state_counts(ledger_path) == {"pending": 25}


def test_resume_after_sigkill(source_target, ledger_path, ledger_url):
    source, target = source_target
    data = fill(source, 300)
    with Proxy("127.0.0.1", target.http_port, delay=0.01) as proxy:
        # One POST per instance (a 20 ms link would batch them), so that POSTs count rows.
        args = ("replicate", source.url, proxy.url, "--ledger", ledger_url, "-c", "4",
                "--batch", "1")  # fmt: skip
        proc = start_cli(*args, "--job", "kill-test")
        wait_for_sent(ledger_path, 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sent_before = {
            r[0]
            for r in ledger_rows(
                ledger_path, "SELECT orthanc_id FROM instances WHERE state = 'sent'"
            )
        }
        assert 60 <= len(sent_before) < 300
        proxy.reset_counts()
        result = run_cli(*args, "--job", "kill-test")
        assert result.code == 0, result.stderr
        # Nothing already recorded as sent was posted again.
        assert proxy.count("POST", "/instances") == 300 - len(sent_before)
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)
    assert state_counts(ledger_path) == {"sent": 300}
    leases = ledger_rows(
        ledger_path, "SELECT COUNT(*) FROM instances WHERE lease_owner IS NOT NULL"
    )
    assert leases == [(0,)]


def test_sigterm_stops_cleanly_and_resumes(source_target, ledger_path, ledger_url):
    source, target = source_target
    fill(source, 200)
    with Proxy("127.0.0.1", target.http_port, delay=0.02) as proxy:
        args = ("replicate", source.url, proxy.url, "--ledger", ledger_url, "-c", "2")
        proc = start_cli(*args)
        wait_for_sent(ledger_path, 20)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        counts = state_counts(ledger_path)
        assert counts.get("in_flight", 0) == 0
        assert counts.get("sent", 0) < 200
        # Every instance the target holds is recorded as sent, or is pending again.
        assert target.count() >= counts["sent"]
        result = run_cli(*args)
        assert result.code == 0, result.stderr
    assert target.count() == 200
    assert state_counts(ledger_path) == {"sent": 200}


def test_target_down_then_back_up(source_target, ledger_path, ledger_url, tmp_path: Path):
    source, target = source_target
    fill(source, 300)
    config = tmp_path / "fast-retry.toml"
    config.write_text("[retry]\nmax_attempts = 4\nbackoff_initial = 0.2\nbackoff_max = 1.0\n")
    with Proxy("127.0.0.1", source.http_port, delay=0.04) as slow_source:
        proc = start_cli(
            "replicate",
            slow_source.url,
            target.url,
            "--ledger",
            ledger_url,
            "-c",
            "2",
            "--config",
            str(config),
        )
        wait_for_sent(ledger_path, 20)
        target.stop(graceful=False)
        time.sleep(4)  # far longer than the whole retry budget of one instance
        target.start()
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "not answering" in err and "answers again" in err
    assert target.count() == 300
    assert state_counts(ledger_path) == {"sent": 300}
    # The outage cost no instance its retry budget.
    assert ledger_rows(ledger_path, "SELECT MAX(attempts) FROM instances")[0][0] <= 2


FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.PatientID == '{patient}' then
    return false
  end
  return true
end
"""


def test_refused_instances_are_rejected_with_reason(orthanc_factory, ledger_path, ledger_url):
    source = orthanc_factory("source")
    data = fill(source, 100)
    refused = data[0].patient_id
    n_refused = sum(d.patient_id == refused for d in data)
    assert 0 < n_refused < 100
    target = orthanc_factory("target", lua=FILTER.format(patient=refused))
    result = run_cli("replicate", source.url, target.url, "--ledger", ledger_url)
    assert result.code == 1
    assert state_counts(ledger_path) == {"sent": 100 - n_refused, "rejected": n_refused}
    reasons = ledger_rows(
        ledger_path,
        "SELECT DISTINCT last_error, target_status FROM instances WHERE state = 'rejected'",
    )
    assert len(reasons) == 1 and "FilteredOut" in reasons[0][0]
    assert target.count() == 100 - n_refused
    status = json.loads(run_cli("status", "--json", "--ledger", ledger_url).stdout)
    top = status["jobs"][0]["top_errors"][0]
    assert top["count"] == n_refused and top["state"] == "rejected"

    # Once the target accepts them, `retry --state rejected` and a rerun finish the job.
    target.lua = None
    target.restart()
    retried = run_cli("retry", "--state", "rejected", "--ledger", ledger_url)
    assert retried.code == 0 and f"{n_refused} rows" in retried.stdout
    assert run_cli("replicate", source.url, target.url, "--ledger", ledger_url).code == 0
    assert target.count() == 100
