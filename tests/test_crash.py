"""Crash torture: SIGKILL the migrator several times during one job, at moments aimed at
the listing, the transfers and the ledger's commits, then let a rerun finish.

After every kill the ledger must be intact and truthful (every row `sent` is on the
target); after the final run the job must be complete and counted once.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ledger_rows, start_cli
from faultkit import assert_converged, fast_fill, invoke, write_config, write_files

from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import Proxy


def _poll(what: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if what():
                return
        except sqlite3.Error:
            pass  # the ledger is not created yet, or busy
        if proc.poll() is not None:
            raise AssertionError(f"migrator ended early ({proc.returncode}): {proc.stderr}")
        time.sleep(0.02)
    raise AssertionError("the moment to kill never came")


def _count(path: Path, where: str = "1") -> int:
    return ledger_rows(path, f"SELECT COUNT(*) FROM instances WHERE {where}")[0][0]


def _listing_done(path: Path) -> bool:
    return bool(ledger_rows(path, "SELECT listing_done FROM jobs")[0][0])


def _wal_changes(path: Path) -> Callable[[], bool]:
    """True at the first write to the WAL seen after this call (a commit under way)."""
    wal = Path(f"{path}-wal")
    first = wal.stat().st_mtime_ns if wal.exists() else 0

    def changed() -> bool:
        return wal.exists() and wal.stat().st_mtime_ns != first

    return changed


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def _check_truthful(path: Path, target: OrthancProcess) -> int:
    """The ledger survived the kill intact, and every row it calls sent is on the target."""
    assert ledger_rows(path, "PRAGMA integrity_check") == [("ok",)]
    sent = {r[0] for r in ledger_rows(path, "SELECT orthanc_id FROM instances WHERE state='sent'")}
    assert sent <= set(target.instance_ids())
    total, distinct = ledger_rows(
        path, "SELECT COUNT(*), COUNT(DISTINCT source_key) FROM instances"
    )[0]
    assert total == distinct
    return len(sent)


def test_sigkill_torture_replicate(orthanc_factory, tmp_path, ledger_path, ledger_url):
    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = fast_fill(source, 1200, seed=21)
    rng = random.Random(1234)
    # Small listing pages and a little latency: the listing lasts long enough to be hit.
    config = write_config(tmp_path / "crash.toml", page_size=40)
    with Proxy("127.0.0.1", source.http_port, delay=0.005) as src:
        args = ("replicate", src.url, target.url, "--ledger", ledger_url, "-c", "4",
                "--config", str(config), "--job", "torture")  # fmt: skip
        moments: list[tuple[str, Callable[[subprocess.Popen[str]], None]]] = [
            # 1. In the middle of the listing (rows listed, listing not finished).
            ("listing", lambda p: _poll(
                lambda: _count(ledger_path) >= 80 and not _listing_done(ledger_path), p)),
            # 2. While transfers run, at a random moment.
            ("transfers", lambda p: (
                _poll(lambda: _count(ledger_path, "state='sent'") >= 200, p),
                time.sleep(rng.uniform(0.0, 0.4)))),
            # 3. and 4. The moment the WAL is seen growing: a commit under way or just
            # done (the poll is every 20 ms; a commit of a batch takes a few ms).
            ("commit", lambda p: (
                _poll(lambda: _count(ledger_path, "state='sent'") >= 600, p),
                _poll(_wal_changes(ledger_path), p))),
            ("commit", lambda p: (
                _poll(lambda: _count(ledger_path, "state='sent'") >= 850, p),
                _poll(_wal_changes(ledger_path), p))),
        ]  # fmt: skip
        for i, (_name, wait) in enumerate(moments):
            proc = start_cli(*args, env={"MIGRATOR_PROGRESS": "none"})
            wait(proc)
            _kill(proc)
            _check_truthful(ledger_path, target)
            if i == 0:
                # The first kill cut the listing short; the next run resumes it from its
                # saved cursor.
                assert not _listing_done(ledger_path) and _count(ledger_path) < 1200
        result = invoke(*args)  # the final run: in-process is enough
    assert result.code == 0, result.stderr[-2000:]
    assert_converged(ledger_path, data, target)
    statuses = dict(ledger_rows(ledger_path, "SELECT status, COUNT(*) FROM runs GROUP BY status"))
    assert statuses == {"crashed": len(moments), "finished": 1}, statuses


def test_sigkill_during_import_sends(orthanc_factory, tmp_path, ledger_path):
    target = orthanc_factory("target")
    data = fast_dataset(500, seed=22)
    folder = tmp_path / "dicom"
    write_files(folder, data)
    args = ("import", str(folder), target.url, "--ledger", f"sqlite:///{ledger_path}", "-c", "4")
    proc = start_cli(*args, env={"MIGRATOR_PROGRESS": "none"})
    _poll(lambda: _count(ledger_path, "state='sent'") >= 100, proc)
    _poll(_wal_changes(ledger_path), proc)
    _kill(proc)
    assert 100 <= _check_truthful(ledger_path, target) < 500
    result = invoke(*args)
    assert result.code == 0, result.stderr[-2000:]
    assert_converged(ledger_path, data, target)
