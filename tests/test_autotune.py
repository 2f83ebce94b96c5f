"""Self-tuning concurrency: the controller against a simulated server, then real runs.

The simulated server has a knee: a transfer takes `base` seconds while at most `knee`
run at once, and proportionally longer beyond (throughput flat past the knee, latency
rising), with some noise. Time is a fake clock moved from one finished transfer to the
next. The controller must settle within 30% of the knee, follow it when it moves down
(the target gets busy) and up (a window opens), stop at the ceiling, and not climb when
there is not enough work to fill the limit. Then real runs through the testkit's delay
proxy: with no -c the concurrency climbs above its start; --fixed keeps it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import re
import sqlite3
from collections.abc import Callable

import pytest
from faultkit import fast_fill, invoke, write_config

from migrator.config import DEFAULT_CEILING, DEFAULT_FIXED, load_settings
from migrator.engine.adaptive import START, AdaptiveLimit
from migrator.engine.throttle import Gate
from migrator.engine.timetable import Limits, Schedule
from migrator.testkit.proxy import Proxy


class FakeClock:
    """A monotonic clock moved by the simulation."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def knee_at(knee: int, base: float = 0.05) -> Callable[[int], float]:
    """Seconds per transfer with `running` transfers at once: flat up to `knee`."""
    return lambda running: base if running <= knee else base * running / knee


class Server:
    """A simulated server behind an `AdaptiveLimit`; `demand` caps the transfers there
    is work for (None: always more work)."""

    def __init__(self, limit: AdaptiveLimit, clock: FakeClock, seed: int = 1) -> None:
        self.limit = limit
        self.clock = clock
        self.rng = random.Random(seed)
        self.running: list[tuple[float, float]] = []
        self.latency = knee_at(20)
        self.demand: int | None = None
        self.trace: list[tuple[float, int]] = []

    def run(self, seconds: float) -> None:
        """Run for `seconds` of simulated time, recording the limit after each transfer."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            while (self.demand is None or len(self.running) < self.demand) and (
                self.limit.try_acquire()
            ):
                took = self.latency(self.limit.in_use) * self.rng.lognormvariate(0, 0.15)
                heapq.heappush(self.running, (self.clock.now + took, took))
            finished, took = heapq.heappop(self.running)
            self.clock.now = finished
            self.limit.release()
            self.limit.record(took, False)
            self.trace.append((finished, self.limit.allowed))

    def settled(self, last: float) -> float:
        """Where the limit stayed over the last `last` seconds of simulated time: the
        time-weighted median (the probes a step up or down are short excursions)."""
        since = self.clock.now - last
        points = [(t, a) for t, a in self.trace if t >= since]
        spans = sorted((a, t1 - t0) for (t0, a), (t1, _) in itertools.pairwise(points))
        half, seen = sum(d for _, d in spans) / 2, 0.0
        for allowed, duration in spans:
            seen += duration
            if seen >= half:
                return allowed
        raise AssertionError("no trace")


def simulated(ceiling: int = 64) -> tuple[AdaptiveLimit, Server]:
    clock = FakeClock()
    limit = AdaptiveLimit(ceiling, initial=START, clock=clock)
    return limit, Server(limit, clock)


# -- the controller against a simulated server ------------------------------------------


@pytest.mark.parametrize("knee", [6, 20, 45])
def test_settles_near_the_knee(knee):
    limit, server = simulated()
    server.latency = knee_at(knee)
    server.run(30)
    assert 0.7 * knee <= server.settled(15) <= 1.3 * knee
    assert limit.tuner.settled is not None


def test_follows_the_knee_down_then_up():
    _limit, server = simulated()
    server.run(20)
    assert 14 <= server.settled(10) <= 26
    # The target gets busy: the knee drops to 8.
    server.latency = knee_at(8)
    server.run(20)
    assert 5.6 <= server.settled(10) <= 10.4
    # A window opens / the target is free again: the knee rises to 40.
    server.latency = knee_at(40)
    server.run(30)
    assert 28 <= server.settled(10) <= 52


def test_climbs_fast_while_throughput_rises():
    limit, server = simulated()
    server.latency = knee_at(40, base=0.1)
    server.run(4)
    # Doubling per interval from 8: above 30 within 4 s of 0.1 s transfers.
    assert limit.allowed >= 30


def test_stops_at_the_ceiling():
    _limit, server = simulated(ceiling=16)
    server.latency = knee_at(100)
    server.run(20)
    assert max(a for _, a in server.trace) == 16
    assert server.settled(10) >= 15


def test_does_not_climb_without_work_to_fill_the_limit():
    _limit, server = simulated()
    server.demand = 5  # only 5 transfers' worth of work at a time
    server.run(20)
    assert max(a for _, a in server.trace) == START


def test_errors_cut_at_once_and_climb_back_then_tuning_goes_on():
    limit, server = simulated()
    server.latency = knee_at(30)
    server.run(10)
    before = limit.allowed
    server.clock.now += 2
    limit.record(None, True, "HTTP 503")
    assert limit.allowed == before // 2
    server.run(20)
    assert 21 <= server.settled(10) <= 39


def test_gate_fixed_or_adaptive():
    async def main() -> None:
        stop = asyncio.Event()
        fixed = Gate(Limits(), Schedule.parse(()), 5, stop, adaptive=False)
        assert fixed.allowed == 5
        await asyncio.wait_for(fixed.turn(4), 1)  # every worker has its turn
        tuned = Gate(Limits(), Schedule.parse(()), 64, stop)
        assert tuned.allowed == START
        await asyncio.wait_for(tuned.turn(START - 1), 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tuned.turn(START), 0.1)  # beyond the limit: waits
        small = Gate(Limits(), Schedule.parse(()), 3, stop)
        assert small.allowed == 3  # the ceiling below the start value

    asyncio.run(main())


def test_settings_ceiling_and_fixed(tmp_path):
    assert load_settings(env={}).concurrency == DEFAULT_CEILING
    assert load_settings(env={}).adaptive
    assert load_settings(env={}, adaptive=False).concurrency == DEFAULT_FIXED
    assert load_settings(env={}, adaptive=False, concurrency=20).concurrency == 20
    config = write_config(tmp_path / "c.toml", {"adaptive": False})
    assert load_settings(config, env={}).concurrency == DEFAULT_FIXED
    config = write_config(tmp_path / "d.toml", {"adaptive": False}, concurrency=12)
    assert load_settings(config, env={}).concurrency == 12


# -- real runs through the delay proxy ---------------------------------------------------


def run_concurrency(ledger_path) -> list[int]:
    with sqlite3.connect(ledger_path) as db:
        return [row[0] for row in db.execute("SELECT concurrency FROM runs ORDER BY id")]


def test_no_flag_climbs_above_the_start_through_a_slow_link(
    source_target, tmp_path, ledger_path, ledger_url
):
    source, target = source_target
    fast_fill(source, 600, seed=71)
    with (
        Proxy("127.0.0.1", source.http_port, delay=0.03) as src,
        Proxy("127.0.0.1", target.http_port, delay=0.03) as tgt,
    ):
        result = invoke(
            "replicate", src.url, tgt.url, "--ledger", ledger_url, "-v", "--batch", "1",
            env={"MIGRATOR_PROGRESS": "plain"},
        )  # fmt: skip
    assert result.code == 0, result.stderr
    assert target.count() == 600
    # With 60 ms of round trip per request, 8 at once leave the link idle: it climbs.
    climbed = [int(x) for x in re.findall(r"DEBUG concurrency (\d+) \(", result.stderr)]
    assert climbed and climbed[0] == START and max(climbed) > START, result.stderr
    assert run_concurrency(ledger_path)[-1] > START
    assert " at once, " in result.stderr  # the progress line shows it


def test_fixed_keeps_the_concurrency(source_target, tmp_path, ledger_path, ledger_url):
    source, target = source_target
    fast_fill(source, 150, seed=72)
    with (
        Proxy("127.0.0.1", source.http_port, delay=0.03) as src,
        Proxy("127.0.0.1", target.http_port, delay=0.03) as tgt,
    ):
        result = invoke(
            "replicate", src.url, tgt.url, "--ledger", ledger_url, "-c", "3", "--fixed", "-v",
            "--batch", "1",
        )  # fmt: skip
    assert result.code == 0, result.stderr
    assert target.count() == 150
    assert "DEBUG concurrency " not in result.stderr
    assert run_concurrency(ledger_path) == [3]
