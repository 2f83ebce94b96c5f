"""Hostile input: every bad config file, URL, path, ledger URL, rate or window gets one
clear line and a non-zero exit code, never a traceback, and changes nothing (no ledger
file appears). Fuzzed in-process with hypothesis (the CLI through typer's runner, and the
library's parsers); a few cases through a real subprocess too.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import run_cli
from faultkit import invoke
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from migrator.config import load_settings
from migrator.endpoints import parse_endpoint
from migrator.ends.orthanc.client import OrthancClient
from migrator.engine.timetable import parse_bandwidth, parse_rate, parse_window
from migrator.errors import UsageError

# The suite replays the same examples every time (derandomized, so a red build is never
# luck); MIGRATOR_FUZZ=explore draws new ones, ten times as many, to hunt for bugs.
EXPLORE = os.environ.get("MIGRATOR_FUZZ") == "explore"
# Parsers are cheap: many examples. A CLI call in-process costs ~50 ms: fewer.
FUZZ = settings(max_examples=3000 if EXPLORE else 300, deadline=None, derandomize=not EXPLORE)
FUZZ_CLI = settings(
    max_examples=600 if EXPLORE else 60,
    deadline=None,
    derandomize=not EXPLORE,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
BAD_TARGET = "not-a-url"  # fails to parse, so nothing after it ever runs

# Text with the characters that break naive parsers: separators, quotes, control codes.
nasty = st.text(
    alphabet=st.sampled_from(
        string.ascii_letters + string.digits + ":/@?#[]%.-_=,* \t\n\r\x00\x1b'\"\\éß中"
    ),
    max_size=40,
)
urlish = st.builds(
    lambda scheme, user, host, port, path: f"{scheme}{user}{host}{port}{path}",
    st.sampled_from(["http://", "https://", "ftp://", "", "http:/", "HTTP://", "http:///"]),
    st.sampled_from(["", "u@", "u:p@", ":p@", "u:p:q@", "@", "u%zz@"])
    | nasty.map(lambda t: t + "@"),
    st.sampled_from(["", "127.0.0.1", "[::1]", "[::1", "host", "a b", "ex ample.com", "é.com"])
    | nasty,
    st.sampled_from(["", ":8042", ":0", ":99999", ":-1", ":abc", ":"]),
    st.sampled_from(["", "/", "/orthanc/", "/?x=1", "/#f", "/a b"]) | nasty,
)


def _one_clean_line(code: int, stderr: str, stdout: str = "") -> str:
    assert code != 0
    assert "Traceback" not in stderr + stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("migrator: error: "), stderr
    return lines[0]


@pytest.fixture
def workdir(monkeypatch) -> Path:
    """An empty current directory, to see that nothing is created in it."""
    path = Path(tempfile.mkdtemp(prefix="fuzz-"))
    monkeypatch.chdir(path)
    return path


# -- URLs ----------------------------------------------------------------------------------


@FUZZ
@given(text=urlish | nasty)
@example(text="http://u:secret@host:8042/")
@example(text="http://[::1]:8042")
def test_parse_endpoint_accepts_only_usable_urls(text):
    try:
        endpoint = parse_endpoint(text, role="source")
    except UsageError as exc:
        assert "\n" not in str(exc)
        if endpoint_password := _password(text):
            assert f":{endpoint_password}@" not in str(exc)
        return
    # Whatever is accepted, httpx can use it, and the display never shows the password.
    assert endpoint.url.startswith(("http://", "https://")) and endpoint.url.endswith("/")
    httpx.URL(endpoint.url)
    OrthancClient(endpoint, "source")  # builds its httpx client without complaint
    if endpoint.password:
        assert f":{endpoint.password}@" not in endpoint.display


def _password(text: str) -> str | None:
    """The password as migrator reads it (urlsplit: up to the last '@' of the netloc)."""
    try:
        return urlsplit(text.strip()).password or None
    except ValueError:
        return None


@FUZZ_CLI
@given(source=urlish | nasty)
def test_cli_bad_urls_one_line_and_no_ledger(workdir, source):
    result = invoke("replicate", "--ledger", "sqlite:///fz.db", "--", source, BAD_TARGET)
    line = _one_clean_line(result.code, result.stderr, result.stdout)
    assert result.code == 2
    assert "URL" in line
    assert list(workdir.iterdir()) == []


# -- paths ---------------------------------------------------------------------------------


@FUZZ_CLI
@given(path=nasty)
@example(path="")
@example(path="/dev/null")
@example(path="/proc/self/status")
def test_cli_bad_import_paths_one_line_and_no_ledger(workdir, path):
    assume(not path or not os.path.isdir(path) or path in ("",))
    result = invoke("import", "--ledger", "sqlite:///fz.db", "--", path, BAD_TARGET)
    _one_clean_line(result.code, result.stderr, result.stdout)
    assert result.code == 2
    assert list(workdir.iterdir()) == []


def test_import_of_odd_folders(workdir):
    (workdir / "empty").mkdir()
    (workdir / "afile.txt").write_text("hello")
    (workdir / "sub").mkdir()
    (workdir / "sub" / "junk.bin").write_bytes(os.urandom(300))
    before = sorted(workdir.rglob("*"))
    for path in ("empty", "afile.txt", "missing", "sub/junk.bin"):
        result = invoke("import", "--ledger", "sqlite:///fz.db", "--", path, BAD_TARGET)
        _one_clean_line(result.code, result.stderr, result.stdout)
    assert sorted(workdir.rglob("*")) == before


# -- config files ----------------------------------------------------------------------------

KEYS = ["ledger", "concurrency", "timeout", "connect_timeout", "outage_timeout",
        "lease_seconds", "page_size", "progress", "max_attempts", "url", "username",
        "password", "max_rate", "max_bandwidth", "windows", "adaptive", "backoff_max",
        "x y"]  # fmt: skip
TABLES = ["", "[source]", "[target]", "[retry]", "[throttle]", "[other]", "[[retry]]"]
VALUES = st.sampled_from(
    ['"a"', "1", "0", "-1", "1.5", "nan", "inf", "-inf", "true", "[]", '["Mon 10:00-11:00"]',
     "{}", '"sqlite:///x.db"', "1e400", "99999999999999999999", '"\\u0000"', "[1, 2]",
     '"unlimited"', '"10M"', '"50/s"', "1979-05-27", '"none"', '"bar"']
) | nasty.map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')  # fmt: skip


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(TABLES)))
        lines.append(f"{draw(st.sampled_from(KEYS))} = {draw(VALUES)}")
    return "\n".join(lines) + "\n"


@FUZZ_CLI
@given(body=toml_documents() | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
@example(body="timeout = nan\n")
@example(body='[throttle]\nwindows = ["Mon 25:00-26:00"]\n')
def test_config_loader_never_crashes(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_bytes(body.encode("utf-8", "surrogateescape"))
    try:
        settings_ = load_settings(path, env={})
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    # Whatever is accepted is usable.
    for name in ("timeout", "connect_timeout", "outage_timeout", "lease_seconds"):
        value = getattr(settings_, name)
        assert 0 < value < float("inf"), (name, value)


@FUZZ_CLI
@given(body=toml_documents())
def test_cli_bad_config_one_line_and_no_ledger(workdir, body):
    (workdir / "c.toml").write_text(body)
    try:
        load_settings(workdir / "c.toml", env={})
    except UsageError:
        pass
    else:
        assume(False)  # a good config: the run would go on to the network
    result = invoke("replicate", "--config", "c.toml", "--ledger", "sqlite:///fz.db",
                    "--", "http://127.0.0.1:1/", "http://127.0.0.1:2/")  # fmt: skip
    _one_clean_line(result.code, result.stderr, result.stdout)
    assert result.code == 2
    assert sorted(p.name for p in workdir.iterdir()) == ["c.toml"]


# -- throttle options ------------------------------------------------------------------------


WINDOWISH = r"\A[A-Za-z*,\-]{0,12} ?\d{1,2}:\d\d(:\d\d)?-\d{1,2}:\d\d(=[\w/,.]{0,12})?\Z"


def _fails(parse, text) -> bool:  # type: ignore[no-untyped-def]
    try:
        parse(text)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return True
    return False


@FUZZ
@given(
    text=nasty
    | st.from_regex(r"\A[A-Za-z*,\-]{0,12} ?\d{1,2}:\d\d(:\d\d)?-\d{1,2}:\d\d(=[\w/,.]{0,12})?\Z")
)
def test_window_parser_never_crashes(text):
    if _fails(parse_window, text):
        return
    window = parse_window(text)
    assert window.days and all(0 <= d < 7 for d in window.days)
    for start, end in window.spans():
        assert 0 <= start < end <= start + 86400


@FUZZ_CLI
@given(option=st.sampled_from(["--window", "--max-rate", "--max-bandwidth"]), text=nasty)
@example(option="--window", text="Mon-Fri 19:00-07:00=fast")
@example(option="--max-rate", text="0")
@example(option="--max-bandwidth", text="10X")
def test_cli_bad_throttle_options(workdir, option, text):
    parser = {"--window": parse_window, "--max-rate": parse_rate,
              "--max-bandwidth": parse_bandwidth}[option]  # fmt: skip
    assume(_fails(parser, text))
    result = invoke("replicate", option, text, "--ledger", "sqlite:///fz.db",
                    "--", "http://127.0.0.1:1/", "http://127.0.0.1:2/")  # fmt: skip
    _one_clean_line(result.code, result.stderr, result.stdout)
    assert result.code == 2
    assert list(workdir.iterdir()) == []


# -- ledger URLs ---------------------------------------------------------------------------


@FUZZ_CLI
@given(
    url=nasty
    | st.builds(lambda a, b: a + b, st.sampled_from(["sqlite://", "sqlite:///", "sqlite:////",
                                                      "mysql://", "sqlite+foo:///", "://"]), nasty)
)  # fmt: skip
@example(url="sqlite://")
@example(url="sqlite:///no/such/dir/x.db")
def test_cli_bad_ledger_urls_one_line_and_nothing_created(workdir, url):
    assume("postgres" not in url.lower())  # would try to reach a server
    result = invoke("status", "--ledger", url)
    _one_clean_line(result.code, result.stderr, result.stdout)
    assert list(workdir.iterdir()) == []


# -- a few through a real process ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["replicate", "--window", "Mon-Fri 19:00-31:00", "http://a:1/", "http://b:2/"],
         "bad time"),
        (["replicate", "--max-bandwidth", "fast", "http://a:1/", "http://b:2/"], "bad bandwidth"),
        (["replicate", "http://h:8042/\x1b[31mred\nline", BAD_TARGET], "URL"),
        (["import", "/no/such/folder", BAD_TARGET], "no such file"),
        (["replicate", "--config", "bad.toml", "http://a:1/", "http://b:2/"], "not valid TOML"),
    ],
)  # fmt: skip
def test_subprocess_bad_input(workdir, args, why):
    (workdir / "bad.toml").write_text("concurrency = = 3\n")
    result = run_cli(*args, "--ledger", "sqlite:///fz.db")
    line = _one_clean_line(result.code, result.stderr, result.stdout)
    assert result.code == 2 and why in line
    assert "\x1b" not in line
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.toml"]
