"""Throttling: rate and bandwidth limits, weekly windows, adaptive concurrency.

Unit tests of `migrator.engine.timetable` (parsing, which window is open, when the next opens)
and `migrator.engine.throttle` (token bucket, AIMD limit, the gate), then runs against real
Orthanc processes: --max-rate and --max-bandwidth bound the pace, a window that opens in
a few seconds pauses the run until then, and a burst of 503s cuts the concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import ledger_rows, start_cli, state_counts
from faultkit import fast_fill, invoke, write_config, write_files

from migrator.config import load_settings
from migrator.engine.throttle import (
    AdaptiveLimit,
    Gate,
    Legs,
    MemoryBudget,
    TokenBucket,
    is_overload,
)
from migrator.engine.timetable import Limits, Schedule, parse_bandwidth, parse_rate, parse_window
from migrator.errors import UsageError
from migrator.ledger.store import Outcome
from migrator.states import State
from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.faults import ScriptedFaults, Status
from migrator.testkit.proxy import Proxy

MONDAY = datetime(2024, 1, 1)  # a Monday


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """Monday + `day` days at hour:minute."""
    return MONDAY + timedelta(days=day, hours=hour, minutes=minute)


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [("50", 50), ("50/s", 50), (" 50 /s ", 50), ("3000/min", 50), ("7200/h", 2), ("0.5", 0.5),
     ("unlimited", None), ("Unlimited", None)],
)  # fmt: skip
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "abc", "0", "-5", "50/fortnight", "5e3", "1" * 400, "/s"])
def test_parse_rate_rejects(text):
    with pytest.raises(UsageError, match="bad rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("10M", 10e6), ("10MB/s", 10e6), ("10mb", 10e6), ("500K", 500e3), ("1Gi", 2**30),
     ("1.5M", 1.5e6), ("123", 123), ("4KiB/s", 4096), ("unlimited", None)],
)  # fmt: skip
def test_parse_bandwidth(text, value):
    assert parse_bandwidth(text) == value


@pytest.mark.parametrize("text", ["", "10X", "Mi", "0", "0.1", "i", "10 MB per s", "-1M"])
def test_parse_bandwidth_rejects(text):
    with pytest.raises(UsageError, match="bad bandwidth"):
        parse_bandwidth(text)


def test_parse_window_forms():
    night = parse_window("Mon-Fri 19:00-07:00")
    assert night.days == {0, 1, 2, 3, 4} and (night.start, night.end) == (19 * 3600, 7 * 3600)
    assert not night.sets_rate and not night.sets_bandwidth
    weekend = parse_window("Sat-Sun 00:00-24:00=unlimited")
    assert weekend.days == {5, 6} and weekend.sets_rate and weekend.rate is None
    assert parse_window("Mon-Fri 19:00-07:00=50/s").rate == 50
    both = parse_window("daily 22:00-06:00=3000/min,10M")
    assert both.days == set(range(7)) and both.rate == 50 and both.bandwidth == 10e6
    assert parse_window("Fri-Mon 20:00-08:00").days == {4, 5, 6, 0}
    assert parse_window("mon,Wed,FRIDAY 10:00-11:30").days == {0, 2, 4}
    assert parse_window("12:00-13:00:30").end == 13 * 3600 + 30  # every day, seconds
    assert parse_window("* 00:00-24:00").spans()[0] == (0, 86400)


@pytest.mark.parametrize(
    ("text", "why"),
    [("Mon-Fri", "use e.g."), ("Mon-Fri 19-07", "use e.g."), ("Funday 10:00-11:00", "bad days"),
     ("10:00-10:00", "start equals end"), ("25:00-26:00", "bad time"), ("10:60-11:00", "bad time"),
     ("24:00-01:00", "cannot start at 24:00"), ("10:00-11:00=fast", "bad limit"),
     ("10:00-11:00=", "empty limit"), ("Mon Tue 10:00-11:00", "use e.g."),
     ("Mon-Tue-Wed 10:00-11:00", "bad days"), ("10:00-24:01", "bad time"), ("", "use e.g.")],
)  # fmt: skip
def test_parse_window_rejects_with_one_line(text, why):
    with pytest.raises(UsageError) as caught:
        parse_window(text)
    message = str(caught.value)
    assert why in message and "\n" not in message and repr(text) in message


def test_schedule_active_and_next_opening():
    schedule = Schedule.parse(["Mon-Fri 19:00-07:00=50/s", "Sat-Sun 00:00-24:00=unlimited"])
    night, weekend = schedule.windows
    assert schedule.active(at(0, 20)) is night  # Monday evening
    assert schedule.active(at(1, 6, 59)) is night  # Tuesday morning, Monday's window
    assert schedule.active(at(1, 7)) is None  # Tuesday 07:00: closed
    assert schedule.active(at(0, 6)) is None  # Monday 06:00: Sunday is not Mon-Fri
    assert schedule.active(at(5, 6)) is night  # Saturday 06:00: both match, first listed wins
    assert schedule.active(at(5, 8)) is weekend
    assert schedule.active(at(6, 23, 59)) is weekend
    assert schedule.next_opening(at(1, 12)) == at(1, 19)
    assert schedule.next_opening(at(4, 18, 30)) == at(4, 19)
    # A window that wraps around the end of the week.
    late = Schedule.parse(["Sun 22:00-02:00"])
    assert late.active(at(6, 23)) is late.windows[0]
    assert late.active(at(0, 1, 30)) is late.windows[0]
    assert late.active(at(0, 2)) is None
    assert late.next_opening(at(0, 2)) == at(6, 22)
    assert Schedule([]).next_opening(at(0, 0)) is None


def test_window_limits_override_the_global_ones():
    defaults = Limits(rate=10, bandwidth=1e6)
    assert parse_window("Mon 10:00-11:00").limits(defaults) == defaults
    assert parse_window("Mon 10:00-11:00=50/s").limits(defaults) == Limits(50, 1e6)
    assert parse_window("Mon 10:00-11:00=5M").limits(defaults) == Limits(10, 5e6)
    assert parse_window("Mon 10:00-11:00=unlimited").limits(defaults) == Limits()


def test_throttle_settings_from_toml_and_errors(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text(
        '[throttle]\nmax_rate = 50\nmax_bandwidth = "10M"\nadaptive = false\n'
        'windows = ["Mon-Fri 19:00-07:00", "Sat-Sun 00:00-24:00=unlimited"]\n'
    )
    settings = load_settings(good, env={})
    assert (settings.max_rate, settings.max_bandwidth, settings.adaptive) == ("50", "10M", False)
    assert settings.windows == ("Mon-Fri 19:00-07:00", "Sat-Sun 00:00-24:00=unlimited")
    # The command line replaces the config's windows.
    assert load_settings(good, env={}, windows=("daily 01:00-02:00",)).windows == (
        "daily 01:00-02:00",
    )
    for body, why in [
        ('[throttle]\nwindows = ["Mon 25:00-26:00"]\n', "bad time"),
        ('[throttle]\nwindows = "Mon 10:00-11:00"\n', "list of strings"),
        ("[throttle]\nmax_rate = true\n", "string or a number"),
        ('[throttle]\nmax_bandwidth = "lots"\n', "bad bandwidth"),
        ('[throttle]\nmax_memory = "lots"\n', "bad memory limit"),
        ('[throttle]\nmax_memory = "10M/s"\n', "bad memory limit"),
        ('[throttle]\nmax_memory = "0"\n', "bad memory limit"),
        ("[throttle]\nadaptive = 1\n", "true or false"),
        ("[throttle]\nspeed = 3\n", "unknown key throttle.speed"),
        ("throttle = 3\n", "must be a table"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        with pytest.raises(UsageError, match=why):
            load_settings(bad, env={})


# -- buckets, the AIMD limit and the gate ------------------------------------------------


def test_memory_budget_admits_what_fits_first_come_first_served():
    async def main() -> list[str]:
        budget = MemoryBudget(100)
        order: list[str] = []
        gates = {name: asyncio.Event() for name in "abcde"}

        async def transfer(name: str, size: int | None) -> None:
            async with budget.hold(size):
                order.append(f"+{name}")
                await gates[name].wait()
            order.append(f"-{name}")

        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(transfer("a", 60))]
        await settle()
        tasks.append(asyncio.create_task(transfer("b", 60)))  # does not fit beside a
        await settle()
        tasks.append(asyncio.create_task(transfer("c", 500)))  # larger than the budget
        await settle()
        tasks.append(asyncio.create_task(transfer("d", 10)))  # fits, but c came first
        tasks.append(asyncio.create_task(transfer("e", None)))  # unknown size: never waits
        await settle()
        assert (budget.held, order) == (60, ["+a", "+e"])
        gates["a"].set()
        await settle()
        assert budget.held == 60 and order[-1] == "+b"
        gates["b"].set()
        await settle()
        assert budget.held == 100 and order[-1] == "+c"  # alone, counted as the budget
        gates["c"].set()
        await settle()
        assert budget.held == 10 and order[-1] == "+d"
        gates["d"].set()
        gates["e"].set()
        await asyncio.gather(*tasks)
        assert budget.held == 0 and budget.peak == 100
        return order

    assert asyncio.run(main()) == [
        "+a", "+e", "-a", "+b", "-b", "+c", "-c", "+d", "-d", "-e"
    ]  # fmt: skip


def test_no_memory_limit_never_waits():
    async def main() -> int:
        budget = MemoryBudget(None)
        async with budget.hold(10**12), budget.hold(10**12):
            return budget.held

    assert asyncio.run(main()) == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_arithmetic():
    clock = FakeClock()
    bucket = TokenBucket(10, clock=clock)  # 10/s, burst 1
    assert bucket.delay(1) == pytest.approx(0.1)
    clock.now += 0.1
    assert bucket.delay(1) == 0
    bucket.charge(1)
    assert bucket.delay(1) == pytest.approx(0.1)
    # A charge beyond the burst is debt: the next take waits it off.
    bytes_bucket = TokenBucket(1000, clock=clock)  # burst 100
    clock.now += 1
    bytes_bucket.charge(5000)
    assert bytes_bucket.delay(0) == pytest.approx(4.9)
    bytes_bucket.set_rate(None)
    assert bytes_bucket.delay(10**9) == 0


def test_token_bucket_paces_takes():
    async def main() -> float:
        bucket = TokenBucket(100)
        started = time.monotonic()
        for _ in range(30):
            await bucket.take(1)
        return time.monotonic() - started

    assert 0.25 <= asyncio.run(main()) < 1.0  # 30 at 100/s after a burst of 10


def test_adaptive_limit_cuts_and_climbs(caplog):
    clock = FakeClock()
    limit = AdaptiveLimit(8, clock=clock)
    caplog.set_level(logging.INFO, logger="migrator")
    limit.record(None, True, "HTTP 503")
    assert limit.allowed == 4
    limit.record(None, True, "HTTP 503")  # within the cooldown: the same trouble
    assert limit.allowed == 4
    clock.now += 1.5
    limit.record(None, True, "timeouts or network errors")
    assert limit.allowed == 2 and limit.lowest == 2 and limit.cuts == 2
    answers = 0
    while limit.allowed < 8:
        limit.record(0.05, False)
        answers += 1
    assert 10 < answers < 60
    messages = [r.getMessage() for r in caplog.records]
    assert "target struggling (HTTP 503): 4 concurrent transfers instead of 8" in messages
    assert "target keeps up again: back to 8 concurrent transfers" in messages
    # Slow answers count too: 3x the usual latency and over a second more.
    clock.now += 5
    limit.record(3.0, False)
    assert limit.allowed == 6


def test_adaptive_limit_blocks_beyond_the_limit():
    async def main() -> list[str]:
        limit = AdaptiveLimit(2)
        events: list[str] = []
        await limit.acquire()
        await limit.acquire()

        async def third() -> None:
            await limit.acquire()
            events.append("third")

        task = asyncio.create_task(third())
        await asyncio.sleep(0.05)
        events.append("released")
        limit.release()
        await task
        return events

    assert asyncio.run(main()) == ["released", "third"]


def test_overload_signals():
    assert is_overload(Outcome(1, State.PENDING, http_status=503)) == (True, "HTTP 503")
    assert is_overload(Outcome(1, State.PENDING, http_status=None))[0]
    assert not is_overload(Outcome(1, State.PENDING, http_status=409))[0]
    assert not is_overload(Outcome(1, State.SENT))[0]
    assert not is_overload(Outcome(1, State.REJECTED, http_status=400))[0]


def test_gate_pauses_outside_windows_until_stopped(caplog):
    caplog.set_level(logging.INFO, logger="migrator")

    async def main() -> tuple[bool, float]:
        stop = asyncio.Event()
        schedule = Schedule.parse(["Mon-Fri 19:00-07:00"])
        gate = Gate(Limits(), schedule, 4, stop, clock=lambda: at(2, 12))  # Wednesday noon
        asyncio.get_running_loop().call_later(0.3, stop.set)
        started = time.monotonic()
        allowed = await gate.before()
        return allowed, time.monotonic() - started

    allowed, waited = asyncio.run(main())
    assert not allowed and 0.25 < waited < 2
    assert any(
        "outside the transfer windows: pausing until Wed 19:00 (in 7h00m)" in r.getMessage()
        for r in caplog.records
    )


def test_gate_applies_the_open_windows_limits(caplog):
    caplog.set_level(logging.INFO, logger="migrator")

    async def main() -> Gate:
        schedule = Schedule.parse(["Mon-Fri 19:00-07:00=20/s,1M", "Sat-Sun 00:00-24:00"])
        gate = Gate(Limits(5, None), schedule, 4, asyncio.Event(), clock=lambda: at(0, 22))
        assert await gate.before()
        gate.after(Outcome(1, State.SENT, size=1000), Legs(fetch=0.01, store=0.01))
        return gate

    gate = asyncio.run(main())
    assert gate.instances.rate == 20 and gate.bytes.rate == 1e6
    assert any("transfer window 'Mon-Fri 19:00-07:00=20/s,1M' open" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# -- against real Orthanc processes ------------------------------------------------------


def _run_seconds(output: str) -> float:
    """The run's own timing, from its summary line ("sent 100 (166.4 KiB) in 2.1 s")."""
    match = re.search(r"this run: sent \d+ \([\d.]+ (?:B|KiB|MiB|GiB)\) in ([\d.]+) s", output)
    assert match, output
    return float(match.group(1))


def test_max_rate_bounds_the_rate(source_target, ledger_path, ledger_url):
    source, target = source_target
    fast_fill(source, 100, seed=41)
    result = invoke(
        "replicate", source.url, target.url, "--ledger", ledger_url, "-c", "8",
        "--max-rate", "50/s",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert target.count() == 100
    # 100 instances at 50/s after a burst of 5: at least 95 / 50 = 1.9 s (unthrottled,
    # the same run takes about 0.9 s on a 2-CPU machine).
    assert 1.85 <= _run_seconds(result.stdout) < 6


def test_max_bandwidth_bounds_the_bytes(source_target, ledger_path, ledger_url):
    source, target = source_target
    data = fast_fill(source, 60, seed=42)
    total = sum(len(d.data) for d in data)  # about 100 KB
    limit = total // 2  # two seconds' worth
    result = invoke(
        "replicate", source.url, target.url, "--ledger", ledger_url, "-c", "4",
        "--max-bandwidth", str(limit),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert target.count() == 60
    # The first 10% of a second is the burst; up to 4 transfers overshoot by one file.
    assert _run_seconds(result.stdout) >= (total - limit * 0.1 - 4 * len(data[0].data)) / limit


def test_window_opening_soon_pauses_until_then(source_target, ledger_path, ledger_url):
    source, target = source_target
    fast_fill(source, 20, seed=43)
    opens = datetime.now().replace(microsecond=0) + timedelta(seconds=4)
    closes = opens + timedelta(hours=1)
    window = f"daily {opens:%H:%M:%S}-{closes:%H:%M:%S}=100/s"
    started = time.time()
    result = invoke("replicate", source.url, target.url, "--ledger", ledger_url, "--window", window)
    assert result.code == 0, result.stderr
    assert f"pausing until {opens:%a %H:%M:%S}" in result.stderr
    assert f"transfer window '{window}' open: running at 100/s" in result.stderr
    ((first,),) = ledger_rows(ledger_path, "SELECT MIN(sent_at) FROM instances")
    assert first >= opens.timestamp() - 0.05 and first > started + 2
    assert target.count() == 20


def test_adaptive_concurrency_backs_off_and_climbs(source_target, tmp_path, ledger_url):
    source, target = source_target
    fast_fill(source, 200, seed=44)
    config = write_config(tmp_path / "fast.toml")
    with Proxy("127.0.0.1", target.http_port) as tgt:
        # The target is "overloaded" for its first 30 POSTs, then healthy.
        tgt.set_faults(ScriptedFaults([Status(503)] * 30))
        result = invoke(
            "replicate", source.url, tgt.url, "--ledger", ledger_url, "-c", "8",
            "--config", str(config),
        )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "target struggling (HTTP 503): 4 concurrent transfers instead of 8" in result.stderr
    assert "target keeps up again: back to 8 concurrent transfers" in result.stderr
    assert target.count() == 200


def test_sigterm_while_paused_stops_at_once(source_target, ledger_path, ledger_url):
    source, target = source_target
    fast_fill(source, 10, seed=45)
    later = datetime.now() + timedelta(hours=2)
    window = f"daily {later:%H:%M}-{later + timedelta(minutes=30):%H:%M}"
    proc = start_cli(
        "replicate", source.url, target.url, "--ledger", ledger_url, "--window", window,
        env={"MIGRATOR_PROGRESS": "none"},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while sum(state_counts_or_none(ledger_path).values()) < 10:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 5
    assert "pausing until" in err
    assert state_counts(ledger_path) == {"pending": 10}  # leases handed back
    assert target.count() == 0


def state_counts_or_none(path: Path) -> dict[str, int]:
    try:
        return state_counts(path)
    except sqlite3.Error:
        return {}


def test_max_memory_smaller_than_a_file_sends_one_at_a_time(orthanc_factory, tmp_path, ledger_url):
    # Each file is larger than the budget: with 8 connections, transfers still run one
    # after the other, each paying the proxy's round trip (~0.05 s) in turn.
    target = orthanc_factory("target")
    data = fast_dataset(30, seed=43)
    folder = tmp_path / "files"
    write_files(folder, data)
    config = write_config(tmp_path / "c.toml", {"max_memory": "1K"})
    with Proxy("127.0.0.1", target.http_port, delay=0.025) as tgt:
        result = invoke(
            "import", str(folder), tgt.url, "--ledger", ledger_url, "-c", "8",
            "--config", str(config),
        )  # fmt: skip
    assert result.code == 0, result.stderr
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)
    assert _run_seconds(result.stdout) >= 30 * 0.05 * 0.9
