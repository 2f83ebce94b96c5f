"""Several workers on one job (PostgreSQL and SQLite ledgers), and the ledger's leases."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlalchemy as sa
from conftest import fill, run_cli, start_cli

from migrator.ledger.store import COPIES_LEASE_LOCK, Ledger, Outcome, make_owner
from migrator.states import State
from migrator.testkit.proxy import Proxy

FAST_LEASES = "lease_seconds = 3.0\n"


def _counts(url: str, sql: str) -> list[tuple]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql)).all()]
    finally:
        engine.dispose()


def _wait_sent(url: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = _counts(url, "SELECT COUNT(*) FROM instances WHERE state = 'sent'")
            if rows[0][0] >= n:
                return
        except sa.exc.SQLAlchemyError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} rows sent after {timeout} s")


def _wait_for(url: str, sql: str, at_least: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _counts(url, sql)[0][0] >= at_least:
                return
        except sa.exc.SQLAlchemyError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {sql}")


def _wait_job(url: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = _counts(url, "SELECT name FROM jobs")
            if rows:
                return rows[0][0]
        except sa.exc.SQLAlchemyError:
            pass
        time.sleep(0.1)
    raise AssertionError("the job never appeared")


def test_leases_are_exclusive_between_ledgers(pg_url):
    first = Ledger.open(pg_url, create=True)
    second = Ledger.open(pg_url)
    try:
        job = first.ensure_job("j", "replicate", "http://a/", "http://b/", {})
        first.save_listing(job.id, [{"source_key": f"k{i}"} for i in range(500)], None, done=True)
        owners = [make_owner(), make_owner()]
        for owner in owners:
            first.start_run(job.id, owner, "test")
        taken: list[list[int]] = [[], []]

        start = threading.Barrier(2)

        def drain(ledger: Ledger, slot: int) -> None:
            start.wait()
            while leases := ledger.lease(job.id, owners[slot], 7, 60):
                taken[slot].extend(lease.id for lease in leases)
                time.sleep(0.005)  # a transfer takes time; lets the other worker in
                ledger.record(owners[slot], [Outcome(x.id, State.SENT) for x in leases])

        threads = [
            threading.Thread(target=drain, args=(ledger, i))
            for i, ledger in enumerate((first, second))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert taken[0] and taken[1]
        assert not set(taken[0]) & set(taken[1])
        assert len(taken[0]) + len(taken[1]) == 500
        assert _counts(pg_url, "SELECT state, COUNT(*) FROM instances GROUP BY state") == [
            ("sent", 500)
        ]
    finally:
        first.close()
        second.close()


def test_expired_lease_comes_back(pg_url):
    ledger = Ledger.open(pg_url, create=True)
    try:
        job = ledger.ensure_job("j", "replicate", "http://a/", "http://b/", {})
        ledger.save_listing(job.id, [{"source_key": "k"}], None, done=True)
        (lease,) = ledger.lease(job.id, "ghost", 10, 0.2)
        assert ledger.lease(job.id, "other", 10, 60) == []
        time.sleep(0.3)
        assert ledger.reclaim_expired(job.id) == 1
        (again,) = ledger.lease(job.id, "other", 10, 60)
        assert again.id == lease.id
        # The ghost's late failure report cannot undo the new owner's lease.
        ledger.record("ghost", [Outcome(lease.id, State.FAILED, error="late")])
        assert _counts(pg_url, "SELECT state, lease_owner FROM instances") == [
            ("in_flight", "other")
        ]
    finally:
        ledger.close()


def _workers_with_one_killed(ledger_url: str, tmp_path: Path, source, target, n_workers: int):
    config = tmp_path / "workers.toml"
    config.write_text(FAST_LEASES)
    n = 600
    data = fill(source, n)
    with Proxy("127.0.0.1", target.http_port, delay=0.03) as proxy:
        first = start_cli(
            "replicate",
            source.url,
            proxy.url,
            "--ledger",
            ledger_url,
            "-c",
            "4",
            "--batch",
            "1",
            "--config",
            str(config),
            "--progress",
            "none",
        )
        job = _wait_job(ledger_url)
        others = [
            start_cli(
                "worker",
                "--job",
                job,
                "--ledger",
                ledger_url,
                "-c",
                "4",
                "--batch",
                "1",
                "--config",
                str(config),
                "--progress",
                "none",
            )
            for _ in range(n_workers - 1)
        ]
        victim = others[0]
        # Kill the victim once it has really taken part: registered and sent some rows.
        _wait_for(ledger_url, f"SELECT COUNT(*) FROM runs WHERE pid = {victim.pid} AND sent >= 5")
        _wait_for(ledger_url, "SELECT COUNT(*) FROM runs WHERE status = 'running'", n_workers)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        codes = []
        for proc in (first, *others[1:]):
            _out, err = proc.communicate(timeout=120)
            codes.append((proc.returncode, err[-2000:]))
        posts = proxy.count("POST", "/instances")
    assert all(code == 0 for code, _ in codes), codes
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)
    rows = _counts(ledger_url, "SELECT orthanc_id, state, lease_owner FROM instances")
    assert len(rows) == n and len({r[0] for r in rows}) == n
    assert {r[1] for r in rows} == {"sent"}
    assert all(r[2] is None for r in rows)
    # One instance per POST (--batch 1; test_batching has the batched version). Every POST
    # follows a lease of its row (no faults here, so no retries), and only the
    # killed worker's rows were leased twice: no instance reached the target three times.
    attempts = _counts(ledger_url, "SELECT SUM(attempts), MAX(attempts) FROM instances")[0]
    assert n < posts <= attempts[0]
    assert attempts[1] <= 2
    workers = _counts(ledger_url, "SELECT status, COUNT(*) FROM runs GROUP BY status")
    assert dict(workers).get("crashed") == 1


def test_three_workers_on_postgresql_one_killed(pg_url, source_target, tmp_path):
    source, target = source_target
    _workers_with_one_killed(pg_url, tmp_path, source, target, 3)


def test_two_processes_on_sqlite_one_killed(source_target, tmp_path, ledger_url):
    source, target = source_target
    _workers_with_one_killed(ledger_url, tmp_path, source, target, 2)


def test_status_json_on_postgresql(pg_url, source_target):
    source, target = source_target
    fill(source, 10)
    assert run_cli("replicate", source.url, target.url, "--ledger", pg_url).code == 0
    status = run_cli("status", "--json", "--ledger", pg_url)
    assert status.code == 0 and '"sent": 10' in status.stdout
    retried = run_cli("retry", "--state", "sent", "--ledger", pg_url)
    assert retried.code == 0 and "10 rows" in retried.stdout
    assert run_cli("replicate", source.url, target.url, "--ledger", pg_url).code == 0
    assert target.count() == 10


def test_lease_takes_at_most_limit_rows(pg_url):
    # A planner that reruns a LIMIT subquery per row once let one lease take every row.
    ledger = Ledger.open(pg_url, create=True)
    try:
        job = ledger.ensure_job("j", "replicate", "http://a/", "http://b/", {})
        rows = [{"source_key": f"k{i}"} for i in range(600)]
        ledger.save_listing(job.id, rows, None, done=True)
        assert [len(ledger.lease(job.id, "w", 32, 60)) for _ in range(3)] == [32, 32, 32]
    finally:
        ledger.close()


def _copies_check_plan(url: str, ledger: Ledger, job_id: int) -> str:
    """The query plan of the candidate query of a one-copy-per-instance lease."""
    seen: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("SELECT") and "other" in statement:
            seen.append((statement, parameters))

    sa.event.listen(ledger.engine, "before_cursor_execute", capture)
    try:
        ledger.lease(job_id, "w", 32, 60, one_per_instance=True)
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", capture)
    (statement, parameters), *_ = seen
    explain = "EXPLAIN QUERY PLAN " if url.startswith("sqlite") else "EXPLAIN "
    with ledger.engine.connect() as conn:
        rows = conn.exec_driver_sql(explain + statement, parameters).all()
    return "\n".join(" ".join(str(c) for c in row) for row in rows)


def test_copies_check_is_one_index_lookup(tmp_path: Path, pg_url: str) -> None:
    # Leasing one copy per instance once made SQLite read every sent row of the job for
    # each candidate row, and blocked copies piled up at the head of the queue, to be
    # read again by every lease (quadratic on large folders).
    for url in (f"sqlite:///{tmp_path / 'l.db'}", pg_url):
        ledger = Ledger.open(url, create=True)
        try:
            job = ledger.ensure_job("j", "import", "/data", "http://b/", {})
            rows = [{"source_key": f"f{i:03d}", "orthanc_id": f"o{i // 2}"} for i in range(400)]
            ledger.save_listing(job.id, rows, None, done=True)
            # Two copies of each instance: never both at once.
            first = ledger.lease(job.id, "w", 100, 60, one_per_instance=True)
            assert len({x.orthanc_id for x in first}) == len(first) == 50
            # Their twins wait while they are in flight: put back, not leased.
            second = ledger.lease(job.id, "w", 100, 60, one_per_instance=True)
            assert len(second) == 25 and second.superseded == 0
            waiting = _counts(
                url.replace("postgresql+psycopg", "postgresql"),
                f"SELECT COUNT(*) FROM instances WHERE state = 'pending' "
                f"AND next_attempt_at > {time.time()}",
            )
            assert waiting == [(50,)]
            # Once sent, their twins are superseded when they come up again.
            ledger.record("w", [Outcome(x.id, State.SENT) for x in first])
            with ledger.engine.begin() as conn:
                conn.exec_driver_sql("UPDATE instances SET next_attempt_at = 0")
            third = ledger.lease(job.id, "w", 400, 60, one_per_instance=True)
            assert third.superseded == 50
            assert len(third) == 125
            leased = {x.orthanc_id for x in [*first, *second, *third]}
            assert len(leased) == 200
            plan = _copies_check_plan(url, ledger, job.id)
            assert "ix_instances_copies" in plan, plan
        finally:
            ledger.close()


def test_two_workers_never_lease_two_copies_at_once(pg_url: str) -> None:
    # Worker A is leasing a copy (in flight, not committed yet) when worker B leases:
    # B must wait for A's commit and then leave the other copy alone, not take it.
    ledger = Ledger.open(pg_url, create=True)
    try:
        job = ledger.ensure_job("j", "import", "/data", "http://b/", {})
        rows = [{"source_key": f"f{i}", "orthanc_id": "o1"} for i in range(2)]
        ledger.save_listing(job.id, rows, None, done=True)
        with ledger.engine.connect() as a:
            a.execute(COPIES_LEASE_LOCK, {"job_id": job.id})
            a.exec_driver_sql("UPDATE instances SET state = 'in_flight' WHERE source_key = 'f0'")
            with ThreadPoolExecutor(1) as pool:
                b = pool.submit(ledger.lease, job.id, "b", 8, 60, one_per_instance=True)
                time.sleep(0.5)
                assert not b.done()  # waits for A's lease to commit
                a.commit()
                leased = b.result(timeout=10)
        assert list(leased) == []
        waiting = _counts(
            pg_url.replace("postgresql+psycopg", "postgresql"),
            "SELECT state, next_attempt_at > extract(epoch from now()) FROM instances "
            "WHERE source_key = 'f1'",
        )
        assert waiting == [("pending", True)]  # put back while its twin is in flight
    finally:
        ledger.close()
