"""`migrator mirror`: the bulk copy, then following the source's change log."""

from __future__ import annotations

import signal
import time

from conftest import fill, ledger_rows, start_cli, wait_for_sent

from migrator.testkit.dicomgen import make_dataset, upload_all
from migrator.testkit.proxy import Proxy


def _wait_count(server, n: int, timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.count() >= n:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"target has {server.count()} instances, not {n}, after {timeout} s")


def test_mirror_follows_the_source_and_resumes(source_target, ledger_path, ledger_url):
    source, target = source_target
    initial = fill(source, 200)
    with Proxy("127.0.0.1", source.http_port, delay=0.03) as slow_source:
        args = (
            "mirror",
            slow_source.url,
            target.url,
            "--ledger",
            ledger_url,
            "--poll",
            "0.5",
            "-c",
            "2",
        )
        proc = start_cli(*args)
        wait_for_sent(ledger_path, 10)
        # Arrives while the bulk copy runs.
        during = make_dataset(20, seed=2)
        upload_all(source, during)
        _wait_count(target, 220)
        # Arrives after the bulk copy: on the target within seconds.
        after = make_dataset(20, seed=3)
        upload_all(source, after)
        lag = _wait_count(target, 240, timeout=30)
        assert lag < 10
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)

        # Arrives while the mirror is stopped; a restart catches up from the change log.
        stopped = make_dataset(15, seed=4)
        upload_all(source, stopped)
        proc = start_cli(*args)
        _wait_count(target, 255)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)

    expected = {d.orthanc_id for d in (*initial, *during, *after, *stopped)}
    assert set(target.instance_ids()) == expected
    rows = ledger_rows(ledger_path, "SELECT orthanc_id, state FROM instances")
    assert len(rows) == len(expected) == 255
    assert {r[0] for r in rows} == expected and {r[1] for r in rows} == {"sent"}
