"""`migrator verify` says "complete" (exit 0) only when the target holds every instance of
the job: rows not sent, vanished from the source, skipped for a copy that was never sent,
and results from before the target lost data all keep it from that, against real Orthanc.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import signal
import time

import pytest
from conftest import ledger_rows, run_cli, start_cli, state_counts

from migrator.ledger.store import Ledger, Outcome
from migrator.states import State, VerifyResult
from migrator.testkit import OrthancProcess, Proxy, make_dataset, upload_all

N = 40

# The reason the folder listing gives a header-only copy of an instance in Orthanc's storage.
HEADER_ONLY = "header-only copy (DicomUntilPixelData)"

REFUSE_PATIENT = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.PatientID ~= '{patient}'
end
"""


@pytest.fixture
def source(tmp_path_factory):
    """A source Orthanc with N instances in 4 studies (one per patient)."""
    server = OrthancProcess(tmp_path_factory.mktemp("source"), name="source").start()
    data = make_dataset(N, studies=4, seed=61)
    upload_all(server, data)
    yield server, data
    server.stop(graceful=False)


def _verify(ledger_url: str, *args: str) -> tuple[int, dict]:
    result = run_cli("verify", "--ledger", ledger_url, "--json", *args)
    assert result.code in (0, 1), result.stderr
    jobs = json.loads(result.stdout)["jobs"]
    assert len(jobs) == 1
    return result.code, jobs[0]


def _wipe(server: OrthancProcess) -> None:
    """Delete every instance the server holds, through its REST API."""
    for orthanc_id in server.instance_ids():
        server.delete_instance(orthanc_id)
    assert server.count() == 0


def test_verify_of_a_dry_run_job_is_not_complete(source, orthanc_factory, ledger_url):
    """A job that sent nothing must not verify as complete."""
    src, _ = source
    target = orthanc_factory("target")
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url, "--dry-run").code == 0

    text = run_cli("verify", "--ledger", ledger_url)
    assert text.code == 1, text.stdout + text.stderr
    assert f"verdict: NOT complete: {N} pending" in text.stdout
    assert "pending: not sent yet: run the job again" in text.stdout
    code, job = _verify(ledger_url)
    assert code == 1 and not job["complete"]
    assert job["blocking"] == {"pending": N}

    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    text = run_cli("verify", "--ledger", ledger_url)
    assert text.code == 0, text.stdout
    assert f"verdict: complete: the target holds every instance of the job ({N} match)" in (
        text.stdout
    )


def test_verify_names_vanished_and_rejected_rows(source, orthanc_factory, ledger_path, ledger_url):
    """Rows the source lost and rows the target refused block exit 0, each counted and
    named with what to run; vanished rows only until the user accepts them."""
    src, data = source
    target = orthanc_factory("target")
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url, "--dry-run").code == 0
    gone = {data[1].orthanc_id, data[2].orthanc_id}
    for orthanc_id in gone:
        src.delete_instance(orthanc_id)
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    assert state_counts(ledger_path) == {"sent": N - 2, "vanished": 2}

    code, job = _verify(ledger_url)
    assert code == 1 and job["blocking"] == {"vanished": 2}
    assert job["match"] == N - 2
    text = run_cli("verify", "--ledger", ledger_url)
    assert text.code == 1
    assert "verdict: NOT complete: 2 vanished" in text.stdout
    assert "--accept-vanished" in text.stdout
    accepted = run_cli("verify", "--ledger", ledger_url, "--accept-vanished")
    assert accepted.code == 0, accepted.stdout
    assert "2 vanished from the source, accepted" in accepted.stdout

    # A second job into a target that refuses one patient's instances.
    refused = data[-1].patient_id
    picky = orthanc_factory("picky", lua=REFUSE_PATIENT.format(patient=refused))
    assert run_cli("replicate", src.url, picky.url, "--ledger", ledger_url).code == 1
    jobs = [r[0] for r in ledger_rows(ledger_path, "SELECT name FROM jobs ORDER BY id")]
    assert len(jobs) == 2
    name = jobs[1]
    n_refused = sum(1 for d in data if d.patient_id == refused and d.orthanc_id not in gone)
    code, job = _verify(ledger_url, "--job", name, "--accept-vanished")
    assert code == 1
    assert job["blocking"] == {"rejected": n_refused}
    text = run_cli("verify", "--ledger", ledger_url, "--job", name)
    assert f"verdict: NOT complete: {n_refused} rejected" in text.stdout
    assert f"migrator retry --job {shlex.quote(name)} --state rejected" in text.stdout


def test_verify_after_the_target_was_wiped_reports_every_instance_missing(
    source, orthanc_factory, ledger_url
):
    """Matches from an earlier verify say nothing about a target wiped since."""
    src, _ = source
    target = orthanc_factory("target")
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    code, job = _verify(ledger_url, "--no-studies")
    assert code == 0 and job["match"] == N
    _wipe(target)

    code, job = _verify(ledger_url, "--no-studies")
    assert code == 1
    assert job["checked"] == N
    assert (job["match"], job["missing"]) == (0, N)
    assert job["blocking"] == {"missing": N}
    # Trusting recent results is a choice the user makes, and the output says so.
    assert run_cli("retry", "--state", "missing", "--ledger", ledger_url).code == 0
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    assert _verify(ledger_url, "--no-studies")[0] == 0
    text = run_cli("verify", "--ledger", ledger_url, "--no-studies", "--max-age", "1h")
    assert text.code == 0
    assert "this pass: checked 0 instances" in text.stdout
    assert f"{N} of the matches were found before this pass (oldest at " in text.stdout
    assert "`migrator verify --all` asks again" in text.stdout


def test_interrupted_verify_all_is_carried_on_by_a_plain_rerun(
    source, orthanc_factory, ledger_path, ledger_url
):
    src, _ = source
    target = orthanc_factory("target")
    assert run_cli("replicate", src.url, target.url, "--ledger", ledger_url).code == 0
    assert _verify(ledger_url, "--no-studies")[0] == 0
    with Proxy("127.0.0.1", target.http_port, delay=0.05) as proxy:
        args = ("verify", "--ledger", ledger_url, "--target-url", proxy.url, "-c", "1")
        launched = time.time()
        proc = start_cli(*args, "--all")
        # Rows this pass has checked (and committed) so far.
        sql = f"SELECT COUNT(*) FROM instances WHERE verified_at >= {launched}"
        done = 0
        deadline = time.monotonic() + 30
        while done < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
            done = ledger_rows(ledger_path, sql)[0][0]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = ledger_rows(ledger_path, sql)[0][0]
        assert 8 <= done < N
        proxy.reset_counts()
        rerun = run_cli(*args, "--no-studies")
        assert rerun.code == 0, rerun.stdout + rerun.stderr
        asked = [p for m, p in proxy.requests() if p.endswith("/md5")]
    assert len(asked) == N - done
    assert f"this pass: checked {N - done} instances" in rerun.stdout
    assert "carried on the pass begun at" in rerun.stdout
    # The pass is finished: the next plain run begins a new one and asks every row.
    code, job = _verify(ledger_url, "--no-studies")
    assert code == 0 and job["checked"] == N and not job["pass"]["resumed"]


def test_verify_blocks_on_a_copy_skipped_for_a_twin_that_was_never_sent(
    orthanc_factory, ledger_url
):
    """A row skipped because another copy stands in for it (header-only, superseded) is
    only fine when that copy was sent."""
    target = orthanc_factory("target")
    data = make_dataset(2, seed=62)
    upload_all(target, data[:1])
    kept, lost = data
    ledger = Ledger.open(ledger_url, create=True)
    try:
        job = ledger.ensure_job("j", "import", "/data", target.url, {})
        rows = [
            {"source_key": "a.dcm", "orthanc_id": kept.orthanc_id},
            {"source_key": "a-head", "orthanc_id": kept.orthanc_id, "skip_reason": HEADER_ONLY},
            {"source_key": "b-head", "orthanc_id": lost.orthanc_id, "skip_reason": HEADER_ONLY},
            {"source_key": "a.json", "skip_reason": "JSON summary (DicomAsJson)"},
        ]  # fmt: skip
        ledger.save_listing(job.id, rows, None, done=True)
        (lease,) = ledger.lease(job.id, "me", 5, 60)
        md5 = hashlib.md5(kept.data).hexdigest()
        ledger.record("me", [Outcome(lease.id, State.SENT, "Success", md5=md5)])
    finally:
        ledger.close()
    code, job = _verify(ledger_url)
    assert code == 1
    assert job["blocking"] == {"skipped without a sent copy": 1}
    assert job["skipped"] == {
        HEADER_ONLY: 2,
        "JSON summary (DicomAsJson)": 1,
    }


def test_verify_blocks_while_the_source_is_not_fully_listed(orthanc_factory, ledger_url):
    """Every listed row matching says nothing about the rows not listed yet."""
    target = orthanc_factory("target")
    data = make_dataset(3, seed=63)
    upload_all(target, data)
    ledger = Ledger.open(ledger_url, create=True)
    try:
        job = ledger.ensure_job("j", "replicate", "http://source:8042/", target.url, {})
        rows = [{"source_key": d.orthanc_id, "orthanc_id": d.orthanc_id} for d in data]
        ledger.save_listing(job.id, rows, '{"since": 3}', done=False)
        leases = ledger.lease(job.id, "me", 3, 60)
        md5 = {d.orthanc_id: hashlib.md5(d.data).hexdigest() for d in data}
        ledger.record(
            "me", [Outcome(le.id, State.SENT, "Success", md5=md5[le.orthanc_id]) for le in leases]
        )
    finally:
        ledger.close()
    code, job = _verify(ledger_url)
    assert code == 1 and job["match"] == 3
    assert job["blocking"] == {"listing unfinished": 1}
    text = run_cli("verify", "--ledger", ledger_url)
    assert "listing unfinished: the source was not fully listed: run the job again" in text.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--since", "nan"),
        ("--since", "inf"),
        ("--since", "-inf"),
        ("--since", "-5"),
        ("--since", "yesterday"),
        ("--max-age", "nan"),
        ("--max-age", "-1h"),
        ("--max-age", "soon"),
        ("--all", "--since", "0"),
        ("--all", "--max-age", "1h"),
    ],
)
def test_verify_refuses_times_that_are_not_times(args, ledger_url):
    ledger = Ledger.open(ledger_url, create=True)
    try:
        # A job whose target does not answer: only the options can end this with exit 2.
        ledger.ensure_job("j", "replicate", "http://source:8042/", "http://127.0.0.1:9/", {})
    finally:
        ledger.close()
    result = run_cli("verify", "--ledger", ledger_url, *args)
    assert result.code == 2, result.stderr
    result.assert_one_line_error()
    assert "--since" in result.stderr or "--max-age" in result.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_verification_pass_and_stand_in_skips_on_both_backends(backend, tmp_path, request):
    """The ledger side of a pass (kept beside the job's options, finished only by the pass
    that began it) and of skipped copies without a sent twin, on SQLite and PostgreSQL."""
    from migrator.engine.verify import select_page
    from migrator.views.verify_report import STAND_IN_REASONS

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else (
        f"sqlite:///{tmp_path / 'l.db'}"
    )  # fmt: skip
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job("j", "import", "/d", "http://t:8042/", {"concurrency": 4})
        rows = [{"source_key": f"k{i}", "orthanc_id": f"o{i}"} for i in range(4)]
        rows += [
            {"source_key": "h0", "orthanc_id": "o0", "skip_reason": HEADER_ONLY},
            {"source_key": "h9", "orthanc_id": "o9", "skip_reason": HEADER_ONLY},
            {"source_key": "j", "skip_reason": "JSON summary (DicomAsJson)"},
        ]
        ledger.save_listing(job.id, rows, None, done=True)
        leases = ledger.lease(job.id, "me", 4, 60)
        ledger.record("me", [Outcome(le.id, State.SENT, "Success", md5="0" * 32) for le in leases])
        assert ledger.skipped_without_copy(job.id, STAND_IN_REASONS) == 1
        assert ledger.skip_reasons(job.id) == {HEADER_ONLY: 2, "JSON summary (DicomAsJson)": 1}

        assert ledger.verify_pass(job.id) is None
        first = ledger.begin_verify_pass(job.id, 100.0, 200.0)
        page = select_page(ledger, job.id, 0, first.since)
        ledger.record_verification([(r.id, VerifyResult.MATCH, None) for r in page[:3]])
        assert len(select_page(ledger, job.id, 0, first.since)) == 1
        newer = ledger.begin_verify_pass(job.id, 300.0, 300.0)
        ledger.end_verify_pass(job.id, first.started_at)  # an older pass ends nothing
        assert ledger.verify_pass(job.id) == newer
        ledger.end_verify_pass(job.id, newer.started_at)
        done = ledger.verify_pass(job.id)
        assert done is not None and done.finished_at is not None and done.since == 300.0
        assert ledger.get_job("j").options["concurrency"] == 4
        count, oldest = ledger.verified_before(job.id, time.time() + 1)
        assert count == 3 and oldest is not None
    finally:
        ledger.close()
