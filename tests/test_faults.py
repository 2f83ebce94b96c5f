"""Convergence under faults: a fault-injecting proxy in front of real Orthanc processes.

Each test injects, at random with a seed, every fault a week on a hospital network brings
(resets before and in the middle of the body, 503, 409, 500, answers dropped after the
target stored the instance, stalls longer than the client's timeout) and checks that the
job still ends complete and counted once (`faultkit.assert_converged`).
"""

from __future__ import annotations

import json
import re

from conftest import ledger_rows, run_cli, state_counts
from faultkit import (
    assert_converged,
    fast_fill,
    invoke,
    write_config,
    write_files,
)

from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.mixed import KINDS as MIXED_KINDS
from migrator.testkit.mixed import MixedFaults
from migrator.testkit.proxy import Proxy

KINDS = set(MIXED_KINDS)


def _retries(output: str) -> int:
    match = re.search(r"retries (\d+)", output)
    assert match, output
    return int(match.group(1))


def test_replication_converges_under_faults(orthanc_factory, tmp_path, ledger_path, ledger_url):
    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = fast_fill(source, 2000, seed=11)
    config = write_config(tmp_path / "faults.toml", timeout=2.0, page_size=250)
    # 2% of each kind on POST /instances: one request in seven meets a fault.
    to_target = MixedFaults(seed=1, p=0.02, p_stall=0.003)
    # The source side: listing pages and file downloads both go through GET /instances.
    from_source = MixedFaults(seed=2, p=0.01, p_stall=0.002, only=("GET", "/instances"))
    with (
        Proxy("127.0.0.1", source.http_port) as src,
        Proxy("127.0.0.1", target.http_port) as tgt,
    ):
        src.set_faults(from_source)
        tgt.set_faults(to_target)
        result = run_cli(
            "replicate", src.url, tgt.url, "--ledger", ledger_url, "-c", "8",
            "--config", str(config), timeout=300,
        )  # fmt: skip
        posts = tgt.count("POST", "/instances")
    assert result.code == 0, result.stderr[-3000:]
    assert set(to_target.injected) == KINDS, to_target.injected
    assert set(from_source.injected) == KINDS, from_source.injected
    assert_converged(ledger_path, data, target)
    # Each fault injected on a POST costs exactly one more POST: nothing is sent again
    # once the target confirmed it (the slack is for genuine 2 s timeouts under load).
    expected_posts = 2000 + sum(to_target.injected.values())
    assert expected_posts <= posts <= expected_posts + 20
    assert _retries(result.stdout + result.stderr) > 0


def test_import_converges_under_faults(orthanc_factory, tmp_path, ledger_path, ledger_url):
    target = orthanc_factory("target")
    data = fast_dataset(1000, seed=12)
    folder = tmp_path / "dicom"
    write_files(folder, data)
    config = write_config(tmp_path / "faults.toml", timeout=2.0)
    plan = MixedFaults(seed=3, p=0.03, p_stall=0.004)
    with Proxy("127.0.0.1", target.http_port) as tgt:
        tgt.set_faults(plan)
        result = run_cli(
            "import", str(folder), tgt.url, "--ledger", ledger_url, "-c", "8",
            "--config", str(config), timeout=300,
        )  # fmt: skip
    assert result.code == 0, result.stderr[-3000:]
    assert set(plan.injected) == KINDS, plan.injected
    assert_converged(ledger_path, data, target)


def test_vanished_instances_end_vanished_with_reason(source_target, ledger_path, ledger_url):
    source, target = source_target
    data = fast_fill(source, 40, seed=13)
    args = ("replicate", source.url, target.url, "--ledger", ledger_url)
    listed = invoke(*args, "--dry-run")
    assert listed.code == 0, listed.stderr
    assert state_counts(ledger_path) == {"pending": 40}
    gone = [d.orthanc_id for d in data[:5]]
    for orthanc_id in gone:
        source.delete_instance(orthanc_id)

    result = invoke(*args)
    # The source deleted them: nothing the migration could do, so not a failure.
    assert result.code == 0, result.stderr
    assert "vanished 5" in result.stdout
    assert state_counts(ledger_path) == {"sent": 35, "vanished": 5}
    rows = ledger_rows(
        ledger_path, "SELECT orthanc_id, attempts, http_status, last_error FROM instances "
        "WHERE state = 'vanished'",
    )  # fmt: skip
    assert sorted(r[0] for r in rows) == sorted(gone)
    for _id, attempts, status, error in rows:
        assert attempts == 1 and status == 404  # not retried
        assert "no longer on the source" in error
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data[5:])

    # Shown in status, and a rerun does not try them again.
    doc = json.loads(invoke("status", "--json", "--ledger", ledger_url).stdout)
    job = doc["jobs"][0]
    assert job["counts"]["vanished"] == 5
    assert any(
        e["state"] == "vanished" and e["count"] == 5 and "no longer on the source" in e["reason"]
        for e in job["top_errors"]
    )
    text = invoke("status", "--ledger", ledger_url).stdout
    assert "vanished 5" in text and "no longer on the source" in text
    report = invoke("report", "--state", "vanished", "-f", "jsonl", "--ledger", ledger_url)
    lines = [json.loads(line) for line in report.stdout.splitlines()]
    assert sorted(r["orthanc_id"] for r in lines) == sorted(gone)
    assert all(r["state"] == "vanished" and "no longer on the source" in r["last_error"]
               for r in lines)  # fmt: skip
    again = invoke(*args)
    assert again.code == 0 and "sent 0 " in again.stdout
    assert ledger_rows(ledger_path, "SELECT MAX(attempts) FROM instances") == [(1,)]


def test_vanished_files_on_import(orthanc_factory, tmp_path, ledger_path, ledger_url):
    target = orthanc_factory("target")
    data = fast_dataset(30, seed=14)
    folder = tmp_path / "dicom"
    write_files(folder, data)
    args = ("import", str(folder), target.url, "--ledger", ledger_url)
    assert invoke(*args, "--dry-run").code == 0
    removed = sorted(folder.rglob("*.dcm"))[:3]
    for path in removed:
        path.unlink()
    result = invoke(*args)
    assert result.code == 0, result.stderr
    assert state_counts(ledger_path) == {"sent": 27, "vanished": 3}
    errors = ledger_rows(ledger_path, "SELECT last_error FROM instances WHERE state = 'vanished'")
    assert all("is gone" in e[0] for e in errors)
    assert target.count() == 27
