"""Rows keep track of the instance the target really holds: the ID the target answered,
an instance the source lost and then stored again, and what a run is doing right now."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import fill, ledger_rows, run_cli, start_cli

from migrator.testkit.dicomgen import make_dataset
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import Proxy


def test_verify_asks_the_target_for_the_id_it_answered(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_path: Path
) -> None:
    target = orthanc_factory("target")
    folder = tmp_path / "files"
    folder.mkdir()
    data = make_dataset(6, seed=31)
    for inst in data:
        (folder / f"{inst.sop_uid}.dcm").write_bytes(inst.data)
    ledger = f"sqlite:///{ledger_path}"
    job = ["--job", "ids", "--ledger", ledger]
    assert run_cli("import", str(folder), target.url, *job, "--dry-run").code == 0
    # As if the ID computed from the file differed from the one the target gives it.
    wrong = "00000000-00000000-00000000-00000000-00000000"
    conn = sqlite3.connect(ledger_path)
    with conn:
        conn.execute(
            "UPDATE instances SET orthanc_id = ? WHERE sop_uid = ?", (wrong, data[0].sop_uid)
        )
    conn.close()
    result = run_cli("import", str(folder), target.url, *job)
    assert result.code == 0, result.stderr
    rows = ledger_rows(ledger_path, "SELECT sop_uid, state, orthanc_id, target_id FROM instances")
    by_uid = {sop: (state, oid, tid) for sop, state, oid, tid in rows}
    assert by_uid[data[0].sop_uid] == ("sent", wrong, data[0].orthanc_id)
    assert all(tid is None for sop, (_, _, tid) in by_uid.items() if sop != data[0].sop_uid)
    verify = run_cli("verify", *job[:4], "--json")
    assert verify.code == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["jobs"][0]["match"] == 6


def test_an_instance_stored_again_after_it_vanished_is_sent(
    source_target: tuple[OrthancProcess, OrthancProcess], ledger_path: Path, ledger_url: str
) -> None:
    source, target = source_target
    data = fill(source, 12)
    doomed = data[3]
    gone = threading.Event()

    def delete_on_first_download(method: str, path: str, index: int) -> None:
        # The source loses the instance just as it is about to be copied.
        wanted = path.startswith(f"/instances/{doomed.orthanc_id}/file")
        if method == "GET" and wanted and not gone.is_set():
            source.delete_instance(doomed.orthanc_id)
            gone.set()

    with Proxy("127.0.0.1", source.http_port) as proxy:
        proxy.set_faults(delete_on_first_download)
        proc = start_cli(
            "mirror", proxy.url, target.url, "--ledger", ledger_url, "--poll", "0.5", "-c", "2"
        )
        try:
            _wait_for(lambda: _state_of(ledger_path, doomed.orthanc_id) == "vanished")
            assert target.count() == 11
            # Stored again on the source: the change log lists it again, and it is sent.
            source.upload(doomed.data)
            _wait_for(lambda: _state_of(ledger_path, doomed.orthanc_id) == "sent")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert doomed.orthanc_id in set(target.instance_ids())
    assert target.count() == 12


def _state_of(ledger_path: Path, source_key: str) -> str | None:
    try:
        rows = ledger_rows(
            ledger_path, f"SELECT state FROM instances WHERE source_key = '{source_key}'"
        )
    except sqlite3.Error:
        return None
    return rows[0][0] if rows else None


def _wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not reached within {timeout} s")
