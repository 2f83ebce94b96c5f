"""`migrator report`: one line per ledger row, streamed, never a password."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime

import pytest
from conftest import ledger_rows, run_cli

from migrator.ledger.store import Ledger
from migrator.states import State, VerifyResult
from migrator.testkit import OrthancProcess, make_dataset, upload_all
from migrator.views import export

PASSWORD = "pw-Zq81x"
FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.PatientID ~= '{patient}'
end
"""


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """A real ledger: 40 instances replicated to a password-protected target that refuses
    one patient's instances, then verified after one instance was deleted."""
    root = tmp_path_factory.mktemp("report")
    source = OrthancProcess(root / "source", name="source").start()
    data = make_dataset(40, studies=4, seed=51)
    upload_all(source, data)
    refused = data[-1].patient_id
    target = OrthancProcess(
        root / "target",
        name="target",
        users={"bob": PASSWORD},
        lua=FILTER.format(patient=refused),
    ).start()
    ledger_path = root / "ledger.db"
    ledger_url = f"sqlite:///{ledger_path}"
    url = target.url.replace("http://", f"http://bob:{PASSWORD}@")
    result = run_cli("replicate", source.url, url, "--ledger", ledger_url)
    assert result.code == 1, result.stderr  # the refused patient's instances are rejected
    target.delete_instance(data[0].orthanc_id)
    env = {"MIGRATOR_TARGET_PASSWORD": PASSWORD}
    assert run_cli("verify", "--ledger", ledger_url, "--no-studies", env=env).code == 1
    yield ledger_path, ledger_url, data
    source.stop(graceful=False)
    target.stop(graceful=False)


COLUMNS = "source_key, orthanc_id, sop_uid, state, target_status, verify_result, attempts"


def test_csv_rows_equal_ledger_rows(replicated, tmp_path):
    ledger_path, ledger_url, data = replicated
    out = tmp_path / "report.csv"
    result = run_cli("report", "--ledger", ledger_url, "--format", "csv", "-o", str(out))
    assert result.code == 0, result.stderr
    assert "40 rows written" in result.stderr
    text = out.read_text()
    assert PASSWORD not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    expected = ledger_rows(ledger_path, f"SELECT {COLUMNS} FROM instances ORDER BY id")
    got = [
        (
            r["source_key"],
            r["orthanc_id"],
            r["sop_uid"],
            r["state"],
            r["target_status"] or None,
            r["verify_result"] or None,
            int(r["attempts"]),
        )
        for r in rows
    ]
    assert got == [tuple(e) for e in expected]
    states = {r["state"] for r in rows}
    assert states == {"sent", "rejected"}
    rejected = [r for r in rows if r["state"] == "rejected"]
    assert rejected and all("FilteredOut" in r["last_error"] for r in rejected)
    missing = [r for r in rows if r["verify_result"] == "missing"]
    assert [r["orthanc_id"] for r in missing] == [data[0].orthanc_id]
    for r in rows:
        assert r["created_at"].endswith("Z")
        datetime.fromisoformat(r["created_at"].replace("Z", "+00:00"))
        if r["state"] == "sent":
            assert r["sent_at"] and r["verified_at"] and r["md5"]
    # The job's target is shown with its user name only.
    assert f":{PASSWORD}@" not in run_cli("status", "--json", "--ledger", ledger_url).stdout


def test_jsonl_to_stdout_with_filters(replicated):
    ledger_path, ledger_url, data = replicated
    result = run_cli(
        "report", "--ledger", ledger_url, "--format", "jsonl", "--state", "rejected",
        "--state", "missing",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert PASSWORD not in result.stdout
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    n_rejected = ledger_rows(
        ledger_path, "SELECT COUNT(*) FROM instances WHERE state = 'rejected'"
    )[0][0]
    assert len(lines) == n_rejected + 1
    assert {line["state"] for line in lines} == {"rejected", "sent"}
    assert [line["orthanc_id"] for line in lines if line["state"] == "sent"] == [data[0].orthanc_id]
    assert set(lines[0]) == set(export.COLUMNS)

    bad = run_cli("report", "--ledger", ledger_url, "--format", "xml")
    assert bad.code == 2
    bad.assert_one_line_error()
    bad = run_cli("report", "--ledger", ledger_url, "--state", "nope")
    assert bad.code == 2


def test_streams_in_id_order_across_pages(tmp_path, monkeypatch):
    """Keyset pagination: every row once, in id order, whatever the page size; a URL with
    a password in an error message is redacted."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'big.db'}", create=True)
    try:
        job = ledger.ensure_job("big", "import", "/data", "http://t:8042/", {})
        rows = [
            {"source_key": f"f{i:05d}.dcm", "orthanc_id": f"id{i}", "study_uid": f"1.2.{i % 7}"}
            for i in range(2500)
        ]
        ledger.save_listing(job.id, rows, None, done=True)
        with ledger._write() as conn:
            conn.exec_driver_sql(
                "UPDATE instances SET state = 'failed', "
                "last_error = 'GET http://u:secret@src:8042/ failed' WHERE id % 100 = 0"
            )
        monkeypatch.setattr(export, "PAGE", 333)
        out = io.StringIO()
        n = export.export(ledger, [job], "jsonl", None, out)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert n == len(lines) == 2500
        assert [line["source_key"] for line in lines] == [r["source_key"] for r in rows]
        failed = [line for line in lines if line["state"] == "failed"]
        assert len(failed) == 25
        assert all("secret" not in line["last_error"] for line in failed)
        assert "u:***@src" in failed[0]["last_error"]

        out = io.StringIO()
        n = export.export(ledger, [job], "csv", None, out, [State.FAILED, VerifyResult.MISSING])
        assert n == 25 and out.getvalue().count("\n") == 26
    finally:
        ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ledger_side_on_both_backends(backend, tmp_path, request):
    """The SQL of report, verify and serve on SQLite and PostgreSQL: keyset pages,
    verification writes and retries, totals, per-minute history."""
    from migrator.engine.verify import select_page
    from migrator.ledger.store import Outcome
    from migrator.views import web
    from migrator.views.verify_report import verification_totals

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else (
        f"sqlite:///{tmp_path / 'l.db'}"
    )  # fmt: skip
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job("j", "replicate", "http://s:8042/", "http://t:8042/", {})
        rows = [{"source_key": f"k{i}", "orthanc_id": f"o{i}"} for i in range(30)]
        ledger.save_listing(job.id, rows, None, done=True)
        leases = ledger.lease(job.id, "me", 30, 60)
        ledger.record("me", [Outcome(le.id, State.SENT, "Success", md5="0" * 32) for le in leases])
        page = select_page(ledger, job.id, 0, None)
        assert [r.source_key for r in page] == [f"k{i}" for i in range(30)]
        results = [(r.id, VerifyResult.MATCH, None) for r in page[:27]]
        results += [(r.id, VerifyResult.MISSING, "not on the target") for r in page[27:]]
        ledger.record_verification(results)
        assert select_page(ledger, job.id, 0, None) == []
        assert len(select_page(ledger, job.id, 0, time.time() + 1)) == 30
        totals = verification_totals(ledger, job.id)
        assert (totals["match"], totals["missing"], totals["unverified"]) == (27, 3, 0)
        assert sum(n for _, n in web.history(ledger, 5)["jobs"][0]["points"]) == 30
        assert web.verify_counts(ledger)["jobs"][0]["results"] == {"match": 27, "missing": 3}
        assert ledger.retry_verification(job.id, [VerifyResult.MISSING]) == 3
        lines = list(export.iter_rows(ledger, job, [State.PENDING]))
        assert [line["source_key"] for line in lines] == ["k27", "k28", "k29"]
        assert all(line["verify_result"] is None for line in lines)
        assert len(list(export.iter_rows(ledger, job))) == 30
    finally:
        ledger.close()
