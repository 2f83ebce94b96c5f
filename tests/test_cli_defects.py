"""Command-line edges against real Orthanc processes: passwords with URL delimiters, bad
ledger URLs and files, spreadsheet-safe CSV, the web server's Host check, closed pipes."""

from __future__ import annotations

import csv
import io
import json
import socket
import sqlite3
import subprocess
import time
import urllib.parse

import httpx
import pytest
from conftest import MIGRATOR, fill, ledger_rows, run_cli, start_cli

from migrator.cli import EXIT_PIPE
from migrator.testkit.orthanc import free_port

# Every character that ends the user information of a URL for a standard parser.
SECRET = "s3cr#e/t?x@y:z"
USERS = {"alice": SECRET}


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert "s3cr" not in text, text


# -- passwords with '#', '/', '?', '@', ':' ---------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://alice:s3cr#et@127.0.0.1:99x/",
        "http://alice:s3cr/et@127.0.0.1:99999/",
        "http://alice:s3cr?et@[zz]:8042/",
        "http://alice:s3cr#et@127.0.0.1:8042/?page=1",
        "http://alice:s3cr@et@/",
        "ftp://alice:s3cr#et@127.0.0.1:8042/",
        "alice:s3cr#et@127.0.0.1:8042",
    ],
)
def test_malformed_url_never_shows_the_password(url, ledger_path, ledger_url):
    for args in ((url, "http://127.0.0.1:1/"), ("http://127.0.0.1:1/", url)):
        result = run_cli("replicate", *args, "--ledger", ledger_url)
        assert result.code == 2, result.stderr
        result.assert_one_line_error()
        _assert_no_secret(result.stdout, result.stderr)
        assert "alice" in result.stderr  # the user name stays, to say which URL
        assert not ledger_path.exists()


def test_password_with_url_delimiters_reaches_orthanc(orthanc_factory, tmp_path):
    """Given as typed, percent-encoded, or from the environment, the password works."""
    source = orthanc_factory("source")
    target = orthanc_factory("target", users=USERS)
    fill(source, 3)
    port = target.http_port
    ways = {
        "typed": (f"http://alice:{SECRET}@127.0.0.1:{port}/", {}),
        "encoded": (f"http://alice:{urllib.parse.quote(SECRET, safe='')}@127.0.0.1:{port}/", {}),
        "environment": (f"http://alice@127.0.0.1:{port}/", {"MIGRATOR_TARGET_PASSWORD": SECRET}),
    }
    for way, (url, env) in ways.items():
        ledger = tmp_path / f"{way}.db"
        result = run_cli("replicate", source.url, url, "--ledger", f"sqlite:///{ledger}", env=env)
        assert result.code == 0, f"{way}: {result.stderr}"
        _assert_no_secret(result.stdout, result.stderr)
        assert b"s3cr" not in ledger.read_bytes()
        status = run_cli("status", "--json", "--ledger", f"sqlite:///{ledger}")
        assert "alice@127.0.0.1" in status.stdout
        _assert_no_secret(status.stdout)
    assert target.count() == 3
    # And a wrong one is still refused (the check above is not vacuous).
    wrong = run_cli(
        "replicate",
        source.url,
        f"http://alice:{SECRET[:-1]}@127.0.0.1:{port}/",
        "--ledger",
        f"sqlite:///{tmp_path / 'wrong.db'}",
    )
    assert wrong.code == 3
    _assert_no_secret(wrong.stdout, wrong.stderr)


# -- a reader that goes away -------------------------------------------------------------


@pytest.fixture
def filled_ledger(source_target, ledger_url):
    """A ledger with one finished job of 5 instances, replicated between real Orthancs."""
    source, target = source_target
    fill(source, 5)
    result = run_cli("replicate", source.url, target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    return ledger_url


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("jobs",),
        ("report",),
        ("report", "--format", "jsonl"),
        ("db", "current"),
    ],
)
def test_closed_pipe_ends_quietly(filled_ledger, args):
    proc = subprocess.Popen(
        [*MIGRATOR, *args, "--ledger", filled_ledger],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The reader goes away before the command writes anything, as `| head -0` would.
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert err == ""
    assert proc.returncode == EXIT_PIPE


# -- ledgers that are not ledgers --------------------------------------------------------


@pytest.mark.parametrize("command", [("status",), ("db", "current"), ("db", "upgrade")])
def test_ledger_url_with_a_bad_port_is_bad_input(command):
    result = run_cli(*command, "--ledger", "postgresql://alice:s3cret@127.0.0.1:99x/ledger")
    assert result.code == 2, result.stderr
    result.assert_one_line_error()
    assert "internal error" not in result.stderr
    _assert_no_secret(result.stdout, result.stderr)


@pytest.mark.parametrize("command", [("status",), ("db", "current"), ("db", "upgrade")])
def test_file_that_is_not_a_database_is_bad_input(command, ledger_path, ledger_url):
    content = b"name,size\nscan.dcm,512\n" * 200
    ledger_path.write_bytes(content)
    result = run_cli(*command, "--ledger", ledger_url)
    assert result.code == 2, result.stderr
    result.assert_one_line_error()
    assert "not a migrator ledger" in result.stderr
    assert ledger_path.read_bytes() == content


def test_upgrade_refuses_a_database_of_something_else(ledger_path, ledger_url):
    conn = sqlite3.connect(ledger_path)
    conn.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    result = run_cli("db", "upgrade", "--ledger", ledger_url)
    assert result.code == 2, result.stderr
    result.assert_one_line_error()
    assert "not a migrator ledger" in result.stderr
    assert [name for (name,) in ledger_rows(ledger_path, "SELECT name FROM sqlite_master")] == [
        "patients"
    ]


# -- CSV that a spreadsheet opens safely ------------------------------------------------


def test_csv_report_never_starts_a_cell_with_a_formula(source_target, ledger_url):
    source, target = source_target
    fill(source, 2)
    jobs = ['=HYPERLINK("http://evil.example/")', "+1+2", "-3+4", "@SUM(A1)", "\tx"]
    for job in jobs:
        result = run_cli("replicate", source.url, target.url, "--job", job, "--ledger", ledger_url)
        assert result.code == 0, result.stderr
    report = run_cli("report", "--ledger", ledger_url)
    assert report.code == 0, report.stderr
    rows = list(csv.DictReader(io.StringIO(report.stdout)))
    assert sorted({row["job"] for row in rows}) == sorted(f"'{job}" for job in jobs)
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), row
    # JSON Lines is for programs: the values as stored.
    jsonl = run_cli("report", "--format", "jsonl", "--ledger", ledger_url)
    assert sorted({json.loads(line)["job"] for line in jsonl.stdout.splitlines()}) == sorted(jobs)


# -- the web server answers only for its own names ---------------------------------------


@pytest.mark.parametrize("bound", ["127.0.0.1", "0.0.0.0"])
def test_serve_refuses_unknown_host_names(filled_ledger, bound):
    port = free_port()
    proc = start_cli(
        *("serve", "--host", bound, "--port", str(port), "--ledger", filled_ledger),
        *("--allow-host", "dash.example"),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/api/status", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)

        def get(path: str, host: str) -> httpx.Response:
            return httpx.get(base + path, headers={"Host": host}, timeout=10)

        # A page of a rebound domain name, and malformed names: nothing from the ledger.
        for host in (f"evil.example:{port}", "evil.example", "localhost.evil.example", "a:b"):
            for path in ("/api/status", "/metrics", "/"):
                answer = get(path, host)
                assert answer.status_code == 421, (host, path)
                assert "replicate:" not in answer.text
        names = [
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"[::1]:{port}",
            "DASH.example.",
            socket.gethostname(),
        ]
        for host in names:
            answer = get("/api/status", host)
            assert answer.status_code == 200, host
            assert answer.json()["jobs"][0]["name"].startswith("replicate:")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "evil.example" in err  # the operator sees what was refused
