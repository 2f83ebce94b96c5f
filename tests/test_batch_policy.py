"""The automatic batch size: decided from what an instance costs alone and in a batch,
given the measured round trips of both ends; and the self-tuning concurrency's first
decision, one latency after the first answer."""

from __future__ import annotations

import pytest

from migrator.engine.autotune import MIN_WINDOW, WARMUP, Tuner
from migrator.engine.batching import (
    AUTO_MAX,
    AUTO_MIN,
    STOW_AMORTISED,
    STOW_MIN,
    STOW_WORTH,
    WORTH,
    BatchPolicy,
    batch_saving,
)


def decided(round_trips: float, **kwargs: float) -> int:
    policy = BatchPolicy()
    policy.decide(round_trips, **kwargs)
    assert policy.decided
    return policy.size


@pytest.mark.parametrize(
    ("round_trips", "size"),
    [
        (0.0008, 1),  # a local link: a few hundred microseconds saved, not worth it
        (0.012, 1),  # a busy machine's loopback through a proxy can measure this
        (0.030, 1),
        (0.034, AUTO_MIN),  # 17 ms RTT each end: batches
        (0.040, AUTO_MIN),  # 20 ms RTT
        (0.060, 24),  # one instance per 2.5 ms of round trips
        (0.200, AUTO_MAX),  # 100 ms RTT: capped
        (2.0, AUTO_MAX),
    ],
)
def test_size_follows_the_cost_of_round_trips(round_trips, size):
    assert decided(round_trips) == size


def test_batches_start_where_they_save_worth_per_instance():
    sizes = {ms: decided(ms / 1000) for ms in range(1, 60)}
    first = min(ms for ms, size in sizes.items() if size > 1)
    # Every measure above the first batched one batches too, and the first one saves
    # WORTH seconds per instance (within one millisecond of round trips).
    assert all(sizes[ms] > 1 for ms in sizes if ms >= first)
    assert batch_saving(first / 1000, sizes[first]) >= WORTH
    assert batch_saving((first - 1) / 1000, AUTO_MIN) < WORTH


def test_stow_batches_pay_from_a_shorter_round_trip():
    stow = {"worth": STOW_WORTH, "amortised": STOW_AMORTISED, "smallest": STOW_MIN}
    assert decided(0.005, **stow) == 1
    assert decided(0.012, **stow) == 12
    assert decided(0.003, **stow) == 1
    assert decided(0.050, **stow) == AUTO_MAX


def test_forced_size_is_kept():
    policy = BatchPolicy(forced=5)
    policy.decide(0.5)
    assert policy.size == 5
    off = BatchPolicy(forced=1)
    off.decide(0.5)
    assert off.size == 1


def test_first_decision_one_window_after_the_first_answer():
    latency = 0.1
    tuner = Tuner(8, 1, 64, now=0.0)
    tuner.use(0.0, 8)
    # Eight transfers of 0.1 s at once from 0 s on, each replaced as it finishes: the
    # first answer at 0.1 s, then one every 1/80 s.
    changed, now = None, 0.0
    for i in range(200):
        now = latency + i * latency / 8
        changed = tuner.finished(now, latency)
        if changed is not None:
            break
    assert changed == 16
    # Measured from the first answer for the startup window (here MIN_WINDOW), with no
    # warm-up of a latency before it (the limit had not changed).
    assert latency + MIN_WINDOW <= now < latency + WARMUP * latency + MIN_WINDOW, now
