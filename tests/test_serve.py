"""`migrator serve`: the APIs, /metrics, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from cdp import Browser, chromium_binary
from conftest import ledger_rows, run_cli, start_cli

from migrator.testkit import OrthancProcess, free_port, make_dataset, upload_all

N = 40
FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.PatientID ~= '{patient}'
end
"""
VOLATILE = ("rate", "bytes_rate", "eta_seconds")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A ledger filled by a real replication (some instances refused by the target), and
    `migrator serve` running on it."""
    root = tmp_path_factory.mktemp("serve")
    source = OrthancProcess(root / "source", name="source").start()
    data = make_dataset(N, studies=4, seed=61)
    upload_all(source, data)
    target = OrthancProcess(
        root / "target", name="target", lua=FILTER.format(patient=data[-1].patient_id)
    ).start()
    ledger_path = root / "ledger.db"
    ledger_url = f"sqlite:///{ledger_path}"
    result = run_cli("replicate", source.url, target.url, "--ledger", ledger_url, "--job", "demo")
    assert result.code == 1, result.stderr
    source.stop(graceful=False)
    target.stop(graceful=False)
    port = free_port()
    proc = start_cli("serve", "--port", str(port), "--ledger", ledger_url)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "api/status", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"serve did not start: {proc.communicate()}") from None
            time.sleep(0.1)
    yield base, ledger_path, ledger_url
    proc.terminate()
    proc.wait(10)


def _counts(ledger_path):
    return dict(ledger_rows(ledger_path))


def test_api_status_is_status_json(served):
    base, ledger_path, ledger_url = served
    api = httpx.get(base + "api/status").json()
    cli = json.loads(run_cli("status", "--json", "--ledger", ledger_url).stdout)
    for doc in (api, cli):
        for job in doc["jobs"]:
            for key in VOLATILE:
                job.pop(key)
    assert api == cli
    (job,) = api["jobs"]
    assert job["counts"]["sent"] == _counts(ledger_path)["sent"] == N // 2
    assert job["top_errors"][0]["state"] == "rejected"


def test_history_and_metrics(served):
    base, _, _ = served
    history = httpx.get(base + "api/history", params={"minutes": 5}).json()
    (job,) = history["jobs"]
    assert len(job["points"]) == 5
    assert sum(n for _, n in job["points"]) == N // 2

    response = httpx.get(base + "metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    assert f'migrator_instances{{job="demo",state="sent"}} {N // 2}' in lines
    assert f'migrator_instances{{job="demo",state="rejected"}} {N // 2}' in lines
    assert any(line.startswith('migrator_bytes_sent_total{job="demo"} ') for line in lines)
    assert any(line.startswith('migrator_rate{job="demo"} ') for line in lines)
    assert "# TYPE migrator_bytes_sent_total counter" in lines

    assert httpx.post(base + "api/status").status_code == 405
    assert httpx.get(base + "nope").status_code == 404
    assert httpx.get(base + "api/history", params={"minutes": "x"}).status_code == 400


def test_page_shows_the_ledger_and_updates_live(served, tmp_path):
    base, ledger_path, ledger_url = served
    chromium_binary()
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(base)
        count = 'document.querySelector(\'[data-job="demo"] [data-state="{}"]\')?.textContent'
        assert browser.wait_for(count.format("sent")) == str(N // 2)
        assert browser.evaluate(count.format("rejected")) == str(N // 2)
        assert browser.evaluate(count.format("pending")) == "0"
        text = browser.evaluate("document.body.innerText")
        assert "FilteredOut" in text and f"{N} of {N} done" in text
        # Studies by how far they got: the refused patient's two are failed.
        studies = 'document.querySelector(\'[data-job="demo"] [data-studies="{}"]\')?.textContent'
        assert browser.wait_for(studies.format("failed")) == "2"
        assert browser.evaluate(studies.format("complete")) == "2"
        browser.evaluate("window.marker = 'same page'")

        # Change the ledger under the page: it follows without a reload.
        assert run_cli("retry", "--state", "rejected", "--ledger", ledger_url).code == 0
        assert _counts(ledger_path)["pending"] == N // 2
        browser.wait_for(f"{count.format('pending')} === '{N // 2}'", timeout=10)
        assert browser.evaluate(count.format("rejected")) == "0"
        assert browser.evaluate("window.marker") == "same page"
        png = browser.screenshot(tmp_path / "page.png")
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    finally:
        browser.close()
