"""Shared fixtures: throwaway Orthanc processes, synthetic data, and the CLI as a subprocess."""

from __future__ import annotations

import os
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from migrator.testkit.dicomgen import SyntheticInstance, make_dataset, upload_all
from migrator.testkit.orthanc import OrthancProcess, wait_port

MIGRATOR = [sys.executable, "-m", "migrator"]


@dataclass
class CliResult:
    """A finished `migrator` subprocess."""

    code: int
    stdout: str
    stderr: str

    def assert_one_line_error(self) -> None:
        """The failure was reported as one clear line, without a traceback."""
        assert self.code != 0
        assert "Traceback" not in self.stderr + self.stdout
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("migrator: error:")]
        assert len(errors) == 1, self.stderr


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """Run `migrator ARGS` to completion."""
    full_env = {**os.environ, "MIGRATOR_PROGRESS": "none", **(env or {})}
    proc = subprocess.run(
        [*MIGRATOR, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `migrator ARGS` in the background."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [*MIGRATOR, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def ledger_rows(path: Path, sql: str = "SELECT state, COUNT(*) FROM instances GROUP BY state"):
    """Query an SQLite ledger directly (read-only), independently of migrator's code."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def state_counts(path: Path) -> dict[str, int]:
    """Rows per state in an SQLite ledger."""
    return dict(ledger_rows(path))


def wait_for_sent(path: Path, n: int, timeout: float = 60) -> int:
    """Poll a ledger being written by another process until `n` rows are sent."""
    deadline = time.monotonic() + timeout
    sent = 0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            sent = state_counts(path).get("sent", 0)
        except sqlite3.Error:
            continue  # not created yet
        if sent >= n:
            return sent
    raise AssertionError(f"only {sent} rows sent after {timeout} s")


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancProcess]]:
    """Start Orthanc processes on free ports; all are stopped at the end of the test."""
    started: list[OrthancProcess] = []

    def make(name: str = "orthanc", **kwargs: Any) -> OrthancProcess:
        workdir = tmp_path / f"{name}-{len(started)}"
        workdir.mkdir()
        server = OrthancProcess(workdir, name=name, **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        # Throwaway servers: no need for Orthanc's 3 s graceful shutdown.
        server.stop(graceful=False)


@pytest.fixture
def source_target(
    orthanc_factory: Callable[..., OrthancProcess],
) -> tuple[OrthancProcess, OrthancProcess]:
    """An empty source and an empty target Orthanc."""
    return orthanc_factory("source"), orthanc_factory("target")


def fill(server: OrthancProcess, n: int, *, seed: int = 0) -> list[SyntheticInstance]:
    """Upload `n` synthetic instances; returns them."""
    data = make_dataset(n, seed=seed)
    upload_all(server, data)
    assert server.count() == n
    return data


PG_ADMIN_URL = os.environ.get("MIGRATOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards).

    Skips when no server answers, except in CI, where a missing server is a failure.
    """
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is needed in CI: {exc}")
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}")
    name = f"migrator_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """Where the test's SQLite ledger lives."""
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger_url(ledger_path: Path) -> str:
    """SQLite URL of the test's ledger."""
    return f"sqlite:///{ledger_path}"


def self_signed(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for localhost and 127.0.0.1, made with openssl: the
    certificate for clients to trust, and a server-side TLS context that presents it."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return cert, server


@contextmanager
def dcmtk(port: int, *cmd: str) -> Iterator[None]:
    """A DCMTK server (`cmd`: storescp, dcmqrscp) listening on `port` while the block runs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield
    finally:
        proc.terminate()
        proc.wait(10)
