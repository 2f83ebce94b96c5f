"""Bad input and fatal conditions: one clear line, the right exit code, nothing marked."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
from conftest import fill, ledger_rows, run_cli, state_counts

from migrator.ledger import db
from migrator.ledger.store import Ledger
from migrator.testkit.orthanc import free_port

USERS = {"alice": "s3cret-pw"}


@pytest.fixture
def secured(orthanc_factory):
    source = orthanc_factory("source", users=USERS)
    target = orthanc_factory("target", users=USERS)
    return source, target


def _with_auth(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@")


def test_wrong_password_on_source_is_fatal(secured, ledger_path, ledger_url):
    source, target = secured
    fill(source, 5)
    result = run_cli(
        "replicate",
        _with_auth(source.url, "alice", "wrong"),
        _with_auth(target.url, "alice", "s3cret-pw"),
        "--ledger",
        ledger_url,
    )
    assert result.code == 3
    result.assert_one_line_error()
    assert "source" in result.stderr and "credentials" in result.stderr
    assert "wrong" not in result.stderr
    if ledger_path.exists():
        counts = state_counts(ledger_path)
        assert not counts.get("rejected") and not counts.get("failed")


def test_wrong_password_on_target_is_fatal(secured, ledger_path, ledger_url):
    source, target = secured
    fill(source, 5)
    result = run_cli(
        "replicate",
        _with_auth(source.url, "alice", "s3cret-pw"),
        _with_auth(target.url, "alice", "nope"),
        "--ledger",
        ledger_url,
    )
    assert result.code == 3
    result.assert_one_line_error()
    assert "target" in result.stderr
    if ledger_path.exists():
        counts = state_counts(ledger_path)
        assert not counts.get("rejected") and not counts.get("failed")
    assert target.count() == 0


def test_password_never_reaches_ledger_or_output(secured, ledger_path, ledger_url, tmp_path):
    source, target = secured
    fill(source, 8)
    # The target's password comes from the environment, the source's from the URL.
    result = run_cli(
        "replicate",
        _with_auth(source.url, "alice", "s3cret-pw"),
        target.url,
        "--ledger",
        ledger_url,
        env={"MIGRATOR_TARGET_USERNAME": "alice", "MIGRATOR_TARGET_PASSWORD": "s3cret-pw"},
    )
    assert result.code == 0, result.stderr
    assert target.count() == 8
    status = run_cli("status", "--json", "--ledger", ledger_url)
    for text in (result.stdout, result.stderr, status.stdout):
        assert "s3cret-pw" not in text
    for suffix in ("", "-wal"):
        path = Path(str(ledger_path) + suffix)
        if path.exists():
            assert b"s3cret-pw" not in path.read_bytes()
    assert "alice@" in status.stdout


@pytest.mark.parametrize(
    "url",
    ["http//nohost", "ftp://127.0.0.1:8042/", "http://127.0.0.1:99999/", "http://:8042/", ""],
)
def test_malformed_url_is_a_usage_error(url, ledger_path, ledger_url):
    result = run_cli("replicate", url, "http://127.0.0.1:8042/", "--ledger", ledger_url)
    assert result.code == 2
    result.assert_one_line_error()
    assert not ledger_path.exists()


def test_unreachable_host_is_fatal(ledger_url):
    port = free_port()
    result = run_cli(
        "replicate", f"http://127.0.0.1:{port}/", "http://127.0.0.1:1/", "--ledger", ledger_url
    )
    assert result.code == 3
    result.assert_one_line_error()
    assert "unreachable" in result.stderr
    # Nothing was written: no ledger for a run that could not start.
    assert not Path(ledger_url.removeprefix("sqlite:///")).exists()


def test_port_that_is_not_orthanc_is_fatal(source_target, ledger_url):
    source, _ = source_target
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        result = run_cli("replicate", source.url, url, "--ledger", ledger_url)
    finally:
        server.shutdown()
    assert result.code == 3
    result.assert_one_line_error()
    assert "not an Orthanc" in result.stderr


def test_old_ledger_is_refused_until_upgraded(source_target, ledger_path, ledger_url):
    source, target = source_target
    fill(source, 3)
    assert run_cli("replicate", source.url, target.url, "--ledger", ledger_url).code == 0
    engine = db.make_engine(ledger_url, must_exist=True)
    db.downgrade(engine, "0001")
    engine.dispose()

    for args in (("status",), ("replicate", source.url, target.url)):
        result = run_cli(*args, "--ledger", ledger_url)
        assert result.code == 2
        result.assert_one_line_error()
        assert "migrator db upgrade" in result.stderr
    assert ledger_rows(ledger_path, "SELECT version_num FROM alembic_version") == [("0001",)]

    upgraded = run_cli("db", "upgrade", "--ledger", ledger_url)
    assert upgraded.code == 0, upgraded.stderr
    status = run_cli("status", "--ledger", ledger_url)
    assert status.code == 0 and "sent 3" in status.stdout


def test_status_on_missing_ledger_creates_nothing(tmp_path: Path):
    path = tmp_path / "none.db"
    result = run_cli("status", "--ledger", f"sqlite:///{path}")
    assert result.code == 2
    result.assert_one_line_error()
    assert not path.exists()


def test_bad_config_file_is_a_usage_error(tmp_path: Path, ledger_url):
    bad = tmp_path / "bad.toml"
    bad.write_text("concurrency = 'many'\n")
    for config in (bad, tmp_path / "missing.toml"):
        result = run_cli("status", "--config", str(config), "--ledger", ledger_url)
        assert result.code == 2
        result.assert_one_line_error()


def test_every_command_has_help():
    for args in (
        ("--help",),
        ("replicate", "--help"),
        ("status", "--help"),
        ("retry", "--help"),
        ("jobs", "--help"),
        ("db", "upgrade", "--help"),
    ):
        result = run_cli(*args)
        assert result.code == 0, args
        assert "Usage" in result.stdout


def test_new_ledger_gets_every_revision(tmp_path: Path):
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'new.db'}", create=True)
    try:
        assert db.current_revision(ledger.engine) == db.head_revision()
    finally:
        ledger.close()
