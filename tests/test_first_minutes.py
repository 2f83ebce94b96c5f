"""What a new user meets in the first minutes: `--help` that reads as sentences, a page
started before the first job, rows in flight told apart (transferring or queued), and a
rate chart that agrees with the rate shown above it."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from cdp import Browser, chromium_binary
from conftest import MIGRATOR, ledger_rows, run_cli, start_cli, wait_for_sent
from faultkit import fast_fill

from migrator.cli import cli
from migrator.ledger.store import Ledger
from migrator.testkit import Proxy, free_port, make_dataset, upload_all
from migrator.views.reports import job_status
from migrator.views.web_history import History

N = 24

# A line that ends a sentence (possibly inside a closing bracket or quote).
SENTENCE_END = re.compile(r"[.!?:][)\]'\"`]*$")


def _commands() -> Iterator[tuple[list[str], Any]]:
    """Every command and group of the typer app, with the words that call it."""

    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, cmd
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(cli), [])


COMMANDS = list(_commands())


def _help(path: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [*MIGRATOR, *path, "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _description(text: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first box, as stripped lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("╭"):
            break
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


def _listed(text: str) -> list[str]:
    """The rows of the Commands box."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("╭─ Commands"):
            inside = True
        elif line.startswith("╰"):
            inside = False
        elif inside:
            rows.append(line.strip("│").rstrip())
    return rows


def test_every_command_has_help_in_full_sentences():
    assert len(COMMANDS) > 10
    for path, cmd in COMMANDS:
        name = " ".join(["migrator", *path])
        doc = inspect.cleandoc(cmd.help or "")
        assert doc, f"{name} has no help"
        first = doc.split("\n\n")[0]
        assert "\n" not in first, f"{name}: the first paragraph is not one line: {first!r}"
        text = _help(path)
        paragraphs = _description(text)
        assert paragraphs and paragraphs[0][0].startswith(first[:40]), (name, text)
        for paragraph in paragraphs:
            for line, following in pairwise(paragraph):
                assert SENTENCE_END.search(line), (
                    f"{name} --help breaks a sentence: {line!r} / {following!r}"
                )
        if hasattr(cmd, "commands"):
            rows = _listed(text)
            assert len(rows) == len(cmd.commands), (name, rows)
            for row in rows:
                # A row that starts blank continues the description of the one above.
                assert row.startswith(" ") and row[1] != " ", f"{name}: wrapped row {row!r}"
                assert len(row.split()) > 1, f"{name}: a command without help: {row!r}"


# -- serve before the first job ---------------------------------------------------------


@contextlib.contextmanager
def _serving(ledger_url: str) -> Iterator[str]:
    """`migrator serve` on a ledger (that may not exist yet); yields its base URL."""
    port = free_port()
    proc = start_cli("serve", "--port", str(port), "--ledger", ledger_url)
    base = f"http://127.0.0.1:{port}/"
    try:
        _until(lambda: _ok(base, proc), "serve answers")
        yield base
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def _ok(base: str, proc: subprocess.Popen[str]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"serve exited: {proc.communicate()}")
    try:
        return httpx.get(base + "api/status", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what} (last: {value!r})")
        time.sleep(0.2)


def _api(base: str, path: str) -> Any:
    response = httpx.get(base + path, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _done(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs, once none has rows left to send (else an empty list)."""
    return jobs if jobs and not any(job["remaining"] for job in jobs) else []


def _browser(tmp_path: Path) -> Browser | None:
    """A headless Chromium, or None where none is installed (outside CI)."""
    try:
        chromium_binary()
    except pytest.skip.Exception:
        return None
    return Browser(tmp_path / "profile")


def test_serve_before_the_first_job_shows_no_jobs_then_fills_in(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    source, target = orthanc_factory("source"), orthanc_factory("target")
    upload_all(source, make_dataset(N, studies=2, seed=71))
    with _serving(ledger_url) as base:
        assert _api(base, "api/status") == {"jobs": []}
        assert _api(base, "api/history")["jobs"] == []
        assert _api(base, "api/verify") == {"jobs": []}
        assert httpx.get(base + "metrics").status_code == 200
        browser = _browser(tmp_path)
        try:
            if browser is not None:
                browser.open(base)
                empty = "document.getElementById('empty')?.textContent.startsWith('No jobs yet')"
                assert browser.wait_for(empty)
                browser.wait_for("Number(document.body.dataset.updates) >= 2")
            # Serve never makes the ledger: the first job does.
            assert not ledger_path.exists()
            result = run_cli("replicate", source.url, target.url, "--ledger", ledger_url,
                             "--job", "first")  # fmt: skip
            assert result.code == 0, result.stderr
            # (An answer computed while the job ran may be served once more.)
            jobs = _until(lambda: _done(_api(base, "api/status")["jobs"]), "the job appears")
            assert [j["name"] for j in jobs] == ["first"]
            assert jobs[0]["counts"]["sent"] == N
            if browser is not None:
                sent = 'document.querySelector(\'[data-job="first"] [data-state="sent"]\')'
                assert browser.wait_for(f"{sent}?.textContent") == str(N)
                assert browser.evaluate("document.getElementById('empty')") is None
        finally:
            if browser is not None:
                browser.close()

        # /api/verify counts as `migrator verify` does: rows sent again since their
        # check are unverified, not the match found before.
        assert _api(base, "api/verify")["jobs"][0]["pass_started"] is None
        assert run_cli("verify", "--ledger", ledger_url).code == 0
        _until(lambda: _api(base, "api/verify")["jobs"][0]["results"] == {"match": N},
               "verify results shown")  # fmt: skip
        assert run_cli("retry", "--state", "sent", "--ledger", ledger_url).code == 0
        again = run_cli("replicate", source.url, target.url, "--ledger", ledger_url,
                        "--job", "first")  # fmt: skip
        assert again.code == 0, again.stderr
        _until(lambda: _api(base, "api/verify")["jobs"][0]["results"] == {"unverified": N},
               "rows sent again shown unverified")  # fmt: skip
        assert _api(base, "api/verify")["jobs"][0]["pass_started"] is not None
        assert (
            f'migrator_verified{{job="first",result="unverified"}} {N}'
            in httpx.get(base + "metrics").text.splitlines()
        )


def test_serve_on_postgresql_without_tables_waits_for_them(orthanc_factory, pg_url):
    import psycopg

    def tables() -> int:
        with psycopg.connect(pg_url) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()[0]

    source, target = orthanc_factory("source"), orthanc_factory("target")
    upload_all(source, make_dataset(10, studies=1, seed=72))
    with _serving(pg_url) as base:
        assert _api(base, "api/status") == {"jobs": []}
        time.sleep(1.5)
        assert _api(base, "api/status") == {"jobs": []}
        assert tables() == 0
        result = run_cli("replicate", source.url, target.url, "--ledger", pg_url, "--job", "pg")
        assert result.code == 0, result.stderr
        jobs = _until(lambda: _done(_api(base, "api/status")["jobs"]), "the job appears")
        assert jobs[0]["name"] == "pg" and jobs[0]["counts"]["sent"] == 10


def test_serve_still_refuses_a_ledger_that_is_not_one(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("not a database, just notes " * 100)
    wrong = run_cli("serve", "--port", str(free_port()), "--ledger", f"sqlite:///{bad}")
    wrong.assert_one_line_error()
    missing = run_cli("serve", "--ledger", f"sqlite:///{tmp_path}/no/such/folder/l.db")
    missing.assert_one_line_error()
    assert "does not exist" in missing.stderr


# -- rows in flight: transferring or queued; the rate chart and the rate above it ---------


def test_status_tells_transferring_from_queued_and_the_chart_agrees_with_the_rate(
    orthanc_factory, ledger_path, ledger_url
):
    source, target = orthanc_factory("source"), orthanc_factory("target")
    n = 400
    fast_fill(source, n, seed=73)
    # The target 20 ms away each way: each transfer lasts long enough to be seen, while
    # each worker leases rows ahead of its two transfers.
    with Proxy("127.0.0.1", target.http_port, delay=0.02) as slow, _serving(ledger_url) as base:
        proc = start_cli("replicate", source.url, slow.url, "--ledger", ledger_url,
                         "-c", "2", "--batch", "1", "--job", "slow",
                         env={"MIGRATOR_PROGRESS": "none"})  # fmt: skip
        samples, texts, charts = [], [], []
        try:
            wait_for_sent(ledger_path, 20)
            while proc.poll() is None:
                doc = json.loads(run_cli("status", "--json", "--ledger", ledger_url).stdout)
                if proc.poll() is not None:
                    break  # the run ended while status read: its worker may be gone
                (job,) = doc["jobs"]
                samples.append(job)
                if len(texts) < 2:
                    texts.append(run_cli("status", "--ledger", ledger_url).stdout)
                charts.append(_chart_and_rate(ledger_url, base))
        finally:
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    live = [job for job in samples if job["workers"]]
    assert len(live) >= 3, samples
    for job in live:
        in_flight = job["counts"]["in_flight"]
        assert 0 <= job["transferring"] <= 2, job
        assert job["queued"] == in_flight - job["transferring"], job
        (worker,) = job["workers"]
        # (Its rows are counted apart from the job's, a moment later.)
        assert worker["transferring"] + worker["queued"] == worker["in_flight"], worker
        assert worker["concurrency"] is None or 1 <= worker["concurrency"] <= 2, worker
    # Both were seen: rows being sent, and more rows leased ahead of them.
    assert any(job["transferring"] > 0 for job in live), live
    assert any(job["queued"] > job["transferring"] for job in live), live
    assert any(" transferring, " in text and " queued" in text for text in texts), texts
    for exact, shown in charts:
        # Computed at one moment, the chart's peak is not below the rate (the rate is an
        # average of the chart's figures; 2 % for a first minute begun less than a second
        # before its end, which counts as one second).
        peak, rate = exact
        assert peak >= 0.98 * rate - 0.01, exact
        # Through the server, the two answers are a second or so apart.
        peak, rate, elapsed = shown
        if rate and elapsed >= 3:
            assert peak >= 0.8 * rate, shown


def _chart_and_rate(ledger_url: str, base: str) -> tuple[tuple[float, float], tuple]:
    """The chart's peak and the headline rate, computed at one moment from the ledger,
    and as the server answers them (with the seconds since the first send)."""
    # A moment away from a minute's edge: a current minute younger than a second counts
    # as one second (as the rate above does), and rows sent after the moment, which both
    # count, must fall in the same minute.
    while not 1.5 <= time.time() % 60 <= 55:
        time.sleep(0.1)
    ledger = Ledger.open(ledger_url)
    try:
        now = time.time()
        (job,) = ledger.list_jobs()
        rate = job_status(ledger, job, now)["rate"]
        (chart,) = History(ledger).get(60, now)["jobs"]
        exact = (chart["peak"], rate)
    finally:
        ledger.close()
    # The server may answer once more from before the job (stale while it recomputes).
    (hist,) = _until(lambda: _api(base, "api/history?minutes=60")["jobs"], "history")
    (status,) = _until(lambda: _api(base, "api/status")["jobs"], "status")
    assert hist["peak"] == max(hist["rates"])
    metrics = httpx.get(base + "metrics").text
    assert 'migrator_transferring{job="slow"} ' in metrics, metrics
    assert len(hist["rates"]) == len(hist["points"]) == 60
    first = ledger_rows(Path(ledger_url.removeprefix("sqlite:///")),
                        "SELECT MIN(sent_at) FROM instances")[0][0]  # fmt: skip
    return exact, (hist["peak"], status["rate"], time.time() - (first or time.time()))
