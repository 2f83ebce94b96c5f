"""`migrator mirror`: instances deleted on the source, found by comparing inventories."""

from __future__ import annotations

import json
import re
import signal
import time

from conftest import ledger_rows, run_cli, start_cli

from migrator.ledger.deletions import DELETED_ON_SOURCE, DELETED_ON_TARGET
from migrator.testkit.dicomgen import upload_all
from migrator.testkit.fastgen import fast_dataset


def _wait(what, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(0.2)


def _vanished(ledger_path) -> dict[str, str]:
    return dict(
        ledger_rows(
            ledger_path, "SELECT orthanc_id, last_error FROM instances WHERE state = 'vanished'"
        )
    )


def _mirror(source, target, ledger_url, *more: str):
    return start_cli(
        "mirror", source.url, target.url, "--ledger", ledger_url, "--poll", "0.5", "-c", "4", *more
    )


def test_mirror_deletes_on_the_target_what_the_source_deleted(
    source_target, ledger_path, ledger_url
):
    source, target = source_target
    data = fast_dataset(30, seed=21)
    upload_all(source, data)
    proc = _mirror(source, target, ledger_url, "--reconcile-every", "5s", "--propagate-deletes")
    try:
        _wait(lambda: target.count() == 30)
        # A series of ten instances, deleted at once (one by one, a pass could come
        # between two of them and count them in two messages).
        gone = data[10:20]
        with source.client() as http:
            series = http.get(f"instances/{gone[0].orthanc_id}").json()["ParentSeries"]
            http.delete(f"series/{series}").raise_for_status()
        _wait(lambda: target.count() == 20)
        assert set(target.instance_ids()) == {d.orthanc_id for d in data} - {
            g.orthanc_id for g in gone
        }
        # The target's count drops before the pass records the deletions it made.
        deleted = {g.orthanc_id: DELETED_ON_TARGET for g in gone}
        _wait(lambda: _vanished(ledger_path) == deleted)
        # Stored again on the source: listed from its change log and sent again.
        upload_all(source, [gone[0]])
        _wait(lambda: target.count() == 21)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "10 instances sent earlier were deleted on the source" in err
    assert "10 instances deleted on the source were deleted on the target" in err
    status = json.loads(run_cli("status", "--ledger", ledger_url, "--json").stdout)
    reasons = {(e["state"], e["reason"]): e["count"] for e in status["jobs"][0]["top_errors"]}
    assert reasons[("vanished", DELETED_ON_TARGET)] == 9
    assert status["jobs"][0]["deleted"] == {"on_source": 9, "on_target": 9}
    text = run_cli("status", "--ledger", ledger_url).stdout
    assert "deleted on the source after they were sent: 9 (9 deleted on the target too)" in text
    report = run_cli("report", "--ledger", ledger_url, "--state", "vanished", "-f", "jsonl")
    lines = [json.loads(line) for line in report.stdout.splitlines()]
    assert {r["orthanc_id"] for r in lines} == {g.orthanc_id for g in gone[1:]}
    assert {r["last_error"] for r in lines} == {DELETED_ON_TARGET}
    # The stopped mirror's job is complete once its deletions are accepted as wanted.
    assert run_cli("verify", "--ledger", ledger_url).code == 1
    accepted = run_cli("verify", "--ledger", ledger_url, "--accept-vanished")
    assert accepted.code == 0, accepted.stdout


def test_max_deletes_stops_a_mass_deletion_and_deletes_nothing(
    source_target, ledger_path, ledger_url
):
    source, target = source_target
    data = fast_dataset(30, seed=22)
    upload_all(source, data)
    args = ("--reconcile-every", "1s", "--propagate-deletes", "--max-deletes", "5")
    proc = _mirror(source, target, ledger_url, *args)
    try:
        _wait(lambda: target.count() == 30)
        # The source emptied by mistake: its only patient deleted at once (instance by
        # instance, a pass could come after the first few, under the cap).
        with source.client() as http:
            (patient,) = http.get("patients").json()
            http.delete(f"patients/{patient}").raise_for_status()
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert code == 3, err
    stop = re.search(
        r"stopped: (\d+) instances deleted on the source wait to be deleted on the target, "
        r"more than --max-deletes 5: nothing was deleted",
        err,
    )
    assert stop is not None, err
    assert "Traceback" not in err
    assert target.count() == 30
    assert stop.group(1) == "30"
    assert _vanished(ledger_path) == {d.orthanc_id: DELETED_ON_SOURCE for d in data}


def test_without_propagation_deletions_are_recorded_and_kept_on_the_target(
    source_target, ledger_path, ledger_url
):
    source, target = source_target
    data = fast_dataset(20, seed=23)
    upload_all(source, data)
    proc = _mirror(source, target, ledger_url, "--reconcile-every", "1s", "--max-deletes", "0")
    try:
        _wait(lambda: target.count() == 20)
        for inst in data[:12]:
            source.delete_instance(inst.orthanc_id)
        _wait(lambda: len(_vanished(ledger_path)) == 12)
        assert proc.poll() is None  # the cap limits deletions on the target only
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "kept on the target: see --propagate-deletes" in err
    assert target.count() == 20
    assert set(_vanished(ledger_path).values()) == {DELETED_ON_SOURCE}


def test_deletion_options_are_checked_before_anything_runs(ledger_url):
    orthanc, dicomweb = "http://127.0.0.1:8/", "dicomweb+http://127.0.0.1:9/dicom-web"
    for target, option, message in (
        (dicomweb, ("--propagate-deletes",), "the target must be http(s)://"),
        (orthanc, ("--reconcile-every", "soon"), "--reconcile-every 'soon': give a duration"),
        (orthanc, ("--max-deletes", "-1"), "--max-deletes must be 0 or more"),
    ):
        result = run_cli("mirror", "http://127.0.0.1:9/", target, *option, "--ledger", ledger_url)
        assert result.code == 2 and message in result.stderr, result.stderr
        result.assert_one_line_error()
