"""The ledger cannot be written: the run stops at once (exit 3) with a clear message,
nothing is marked that did not happen, and the next run resumes cleanly.

Real mechanisms, since the tests run as root and chmod stops nothing:
- SQLite "disk full": RLIMIT_FSIZE set on the running process (root is not exempt; Python
  ignores SIGXFSZ, so the write fails with EFBIG and SQLite reports an I/O error);
- PostgreSQL: the ledger's role loses its UPDATE privilege mid-run; the database is
  dropped under the run.
"""

from __future__ import annotations

import resource
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from conftest import PG_ADMIN_URL, ledger_rows, start_cli, state_counts
from faultkit import assert_converged, fast_fill, invoke

from migrator.testkit.proxy import Proxy

N = 300


@dataclass
class Broken:
    """How a run that lost its ledger ended."""

    code: int
    stderr: str
    seconds: float  # from the breakage to the process's exit
    posts: int  # POST /instances after the breakage


def _break_mid_run(args: tuple[str, ...], proxy: Proxy, sent: Any, breakage: Any) -> Broken:
    proc = start_cli(*args, env={"MIGRATOR_PROGRESS": "none"})
    try:
        deadline = time.monotonic() + 60
        while _quietly(sent) < 40:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "nothing sent"
            time.sleep(0.05)
        breakage(proc)
        broke, posts = time.monotonic(), proxy.count("POST", "/instances")
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return Broken(
        proc.returncode, err, time.monotonic() - broke, proxy.count("POST", "/instances") - posts
    )


def _quietly(count: Any) -> int:
    try:
        return int(count())
    except Exception:  # the ledger or its tables do not exist yet
        return 0


def _assert_stopped_clearly(broken: Broken, reason: str) -> None:
    assert broken.code == 3, broken.stderr
    assert "Traceback" not in broken.stderr and "internal error" not in broken.stderr
    lines = [line for line in broken.stderr.splitlines() if reason in line]
    assert lines and ("stopped: ledger" in lines[0] or "error: ledger" in lines[0]), broken.stderr
    # At once: within a few seconds, and far fewer sends than the N - 40 left to do.
    assert broken.seconds < 10
    assert broken.posts < N // 3


def test_sqlite_ledger_disk_full(source_target, ledger_path, ledger_url):
    source, target = source_target
    data = fast_fill(source, N, seed=31)
    with Proxy("127.0.0.1", target.http_port, delay=0.01) as tgt:
        args = ("replicate", source.url, tgt.url, "--ledger", ledger_url, "-c", "4")

        def disk_full(proc: subprocess.Popen[str]) -> None:
            # No file of the process may grow beyond 4 KiB from now on.
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (4096, 4096))

        broken = _break_mid_run(
            args, tgt, lambda: state_counts(ledger_path).get("sent", 0), disk_full
        )
        _assert_stopped_clearly(broken, "could not be written")
        counts = state_counts(ledger_path)
        assert set(counts) <= {"pending", "in_flight", "sent"}, counts
        sent = ledger_rows(ledger_path, "SELECT orthanc_id FROM instances WHERE state='sent'")
        assert {r[0] for r in sent} <= set(target.instance_ids())

        result = invoke(*args)
    assert result.code == 0, result.stderr
    assert_converged(ledger_path, data, target)


@pytest.fixture
def pg_role_db() -> Iterator[tuple[str, Any]]:
    """A database owned by a fresh non-superuser role: (URL as that role, superuser
    connection to the database)."""
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}: {exc}")
    suffix = uuid.uuid4().hex[:10]
    role, name = f"mig_role_{suffix}", f"mig_fail_{suffix}"
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f'CREATE DATABASE "{name}" OWNER {role}')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = base.replace("postgres@", f"{role}@", 1) + f"/{name}"
    db_admin = psycopg.connect(f"{base}/{name}", autocommit=True)
    try:
        yield url, db_admin
    finally:
        db_admin.close()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def _pg_sent(db_admin: Any) -> int:
    return int(db_admin.execute("SELECT COUNT(*) FROM instances WHERE state='sent'").fetchone()[0])


def test_postgres_ledger_permission_revoked(source_target, pg_role_db):
    url, db_admin = pg_role_db
    role = url.split("://", 1)[1].split("@", 1)[0]
    source, target = source_target
    data = fast_fill(source, N, seed=32)
    with Proxy("127.0.0.1", target.http_port, delay=0.01) as tgt:
        args = ("replicate", source.url, tgt.url, "--ledger", url, "-c", "4")

        def revoke(_proc: subprocess.Popen[str]) -> None:
            db_admin.execute(f"REVOKE UPDATE ON instances FROM {role}")

        broken = _break_mid_run(args, tgt, lambda: _pg_sent(db_admin), revoke)
        _assert_stopped_clearly(broken, "permission denied")
        states = dict(db_admin.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"))
        assert set(states) <= {"pending", "in_flight", "sent"}, states
        sent = db_admin.execute("SELECT orthanc_id FROM instances WHERE state='sent'").fetchall()
        assert {r[0] for r in sent} <= set(target.instance_ids())

        db_admin.execute(f"GRANT UPDATE ON instances TO {role}")
        result = invoke(*args)
    assert result.code == 0, result.stderr
    assert_converged(lambda sql: db_admin.execute(sql).fetchall(), data, target)


def test_postgres_ledger_dropped(source_target, pg_role_db):
    url, db_admin = pg_role_db
    name = url.rsplit("/", 1)[1]
    source, target = source_target
    fast_fill(source, N, seed=33)
    with Proxy("127.0.0.1", target.http_port, delay=0.01) as tgt:
        args = ("replicate", source.url, tgt.url, "--ledger", url, "-c", "4")

        def drop(_proc: subprocess.Popen[str]) -> None:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

        broken = _break_mid_run(args, tgt, lambda: _pg_sent(db_admin), drop)
        _assert_stopped_clearly(broken, "does not exist")
        # Rerunning says the same in one line, and creates nothing.
        again = invoke(*args)
    assert again.code == 3
    again.assert_one_line_error()
    assert "does not exist" in again.stderr
