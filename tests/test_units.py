"""Unit tests of the pure parts: taxonomy, state machine, endpoints, settings, backoff."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest

from migrator.config import RetryPolicy, load_settings
from migrator.endpoints import parse_endpoint, redact
from migrator.engine.scheduler import backoff_delay
from migrator.errors import Kind, UsageError, classify_status, verdict_for_store_status
from migrator.states import TRANSITIONS, IllegalTransition, State, check_transition, parse_state

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("status", "side", "method", "kind"),
    [
        (401, "target", "POST", Kind.FATAL),
        (403, "source", "GET", Kind.FATAL),
        (409, "target", "POST", Kind.RETRYABLE),
        (429, "target", "POST", Kind.RETRYABLE),
        (500, "target", "POST", Kind.RETRYABLE),
        (503, "source", "GET", Kind.RETRYABLE),
        (507, "target", "POST", Kind.FATAL),
        (400, "target", "POST", Kind.PERMANENT),
        (404, "target", "POST", Kind.PERMANENT),
        (404, "source", "GET", Kind.VANISHED),
        (400, "source", "GET", Kind.FATAL),
    ],
)
def test_classify_status(status, side, method, kind):
    assert classify_status(status, side=side, method=method) is kind


def test_store_statuses():
    assert verdict_for_store_status("Success") is None
    assert verdict_for_store_status("AlreadyStored") is None
    assert verdict_for_store_status("FilteredOut").kind is Kind.PERMANENT
    assert verdict_for_store_status("Whatever").kind is Kind.FATAL


def test_state_machine_table():
    # Final states only leave through a user's retry, or (a copy that did not make it)
    # end skipped once another copy of the instance is sent; a sent instance that the
    # mirror finds deleted on the source ends vanished.
    assert TRANSITIONS[State.SKIPPED] == frozenset({State.PENDING})
    assert TRANSITIONS[State.SENT] == frozenset({State.PENDING, State.VANISHED})
    for state in (State.REJECTED, State.FAILED, State.VANISHED):
        assert TRANSITIONS[state] == frozenset({State.PENDING, State.SKIPPED})
    check_transition(State.PENDING, State.IN_FLIGHT)
    with pytest.raises(IllegalTransition):
        check_transition(State.PENDING, State.SENT)
    with pytest.raises(IllegalTransition):
        check_transition(State.FAILED, State.SENT)
    assert parse_state("In-Flight") is State.IN_FLIGHT
    with pytest.raises(ValueError, match="one of"):
        parse_state("done")


def test_endpoint_keeps_password_out_of_display():
    ep = parse_endpoint("http://alice:p%40ss@Host.example:8042/orthanc", role="source")
    assert ep.url == "http://host.example:8042/orthanc/"
    assert ep.auth == ("alice", "p@ss")
    assert ep.display == "http://alice@host.example:8042/orthanc/"
    assert "p@ss" not in repr(ep)
    assert redact("bad http://bob:secret@x/ url") == "bad http://bob:***@x/ url"


@pytest.mark.parametrize("url", ["", "localhost:8042", "ftp://x/", "http://x:notaport/", "http://"])
def test_bad_endpoints(url):
    with pytest.raises(UsageError):
        parse_endpoint(url, role="target")


def test_settings_precedence(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'concurrency = 3\n[target]\nurl = "http://t:8042/"\npassword = "from-file"\n'
        "[retry]\nmax_attempts = 2\n"
    )
    settings = load_settings(config, env={"MIGRATOR_TARGET_PASSWORD": "from-env"}, concurrency=5)
    assert settings.concurrency == 5
    assert settings.target_password == "from-env"
    assert settings.retry.max_attempts == 2
    assert "from-env" not in repr(settings)


@pytest.mark.parametrize(
    "text",
    ["concurrency = 0", "bogus = 1", "[retry]\nmax_attempts = 'x'", "timeout = true", "[[x]]"],
)
def test_bad_settings(tmp_path, text):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(UsageError):
        load_settings(config, env={})


def test_example_config_is_valid():
    settings = load_settings(ROOT / "config.example.toml", env={})
    assert settings.source_url and settings.target_url


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(max_attempts=10, backoff_initial=1.0, backoff_max=8.0)
    rng = random.Random(1)
    delays = [backoff_delay(attempt, policy, rng) for attempt in range(1, 8)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 8.0 for d in delays)
    assert delays[-1] >= 4.0


def test_progress_bar_counts_and_renders() -> None:
    import io

    from rich.console import Console

    from migrator.engine.progress import BarProgress

    out = io.StringIO()
    bar = BarProgress(Console(file=out, force_terminal=False, width=100))
    bar.start({"pending": 2, "in_flight": 1, "sent": 1})
    bar.add_total(2)
    bar.advance(State.SENT, 1_500_000)
    bar.advance(State.REJECTED, 0)
    bar.close()
    assert (bar.done, bar.total, bar.by_state["sent"], bar.by_state["rejected"]) == (3, 6, 2, 1)
    assert "3/6" in out.getvalue() and "1.4 MiB" in out.getvalue()


@pytest.mark.parametrize(
    ("user", "password"), [("alice", "s3cret-pw"), ("bob", "pa:ss wörd"), ("é", "")]
)
def test_store_sends_the_authorization_httpx_would(user, password):
    # store() posts below httpx's client layer, so it builds the header itself.
    from migrator.ends.orthanc.client import _basic_auth_header

    request = httpx.Request("POST", "http://127.0.0.1:1/instances")
    expected = next(httpx.BasicAuth(user, password).auth_flow(request)).headers["Authorization"]
    assert _basic_auth_header((user, password)) == {"Authorization": expected}
    assert _basic_auth_header(None) == {}
