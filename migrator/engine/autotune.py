"""Self-tuning concurrency: find the knee of throughput against concurrent transfers.

More transfers at once pay while the link's round trips are the bottleneck: throughput
rises in step with the concurrency and each transfer takes as long as before. Past the
knee (a busy server, a full link, our own CPU) throughput stays flat and every extra
transfer only waits in a queue somewhere, so latency rises instead. `Tuner` looks for
that knee the way delay-based congestion control does (TCP Vegas, BBR, the gradient
limiters of Netflix's concurrency-limits):

- decisions are made per *interval* (a few latencies long, after a warm-up of one latency
  so that transfers started under the previous limit are gone), on the interval's
  throughput and median latency, never on a single transfer: single answers are noise;
- *startup*: double the limit each interval while throughput rises with it (at least
  `GROW` of the proportional gain); when it stops (measured twice), settle at throughput
  x latency of the last good level (the transfers the pipe holds: BBR's bandwidth-delay
  product);
- *cruise*: keep the limit, and every few intervals probe a step up (x1.25, kept if
  throughput rises with it) or a step down (x0.8, kept if throughput hardly drops): the
  limit follows the knee when conditions change (a window opens, the target gets busy);
- a rise of latency at an unchanged limit (`LATENCY_RISE`) cuts the limit by the gradient
  (limit x old latency / new latency, at most halving), without waiting for a probe.

An interval in which fewer transfers ran than the limit allowed (nothing left to send,
a rate limit) says nothing about the limit and decides nothing. Errors and timeouts are
not the tuner's business: `migrator.engine.adaptive.AdaptiveLimit` cuts on those at once.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

log = logging.getLogger("migrator")

# An interval: a warm-up of WARMUP latencies (not measured), then a measured window of at
# least MIN_WINDOW seconds, WINDOW latencies and MIN_SAMPLES finished transfers.
WARMUP = 1.0
WINDOW = 3.0
MIN_WINDOW = 0.25
# Startup's measured window, in latencies: short, as a doubling's effect is large, but
# whole ones (the first transfers start together and finish in waves, one a latency:
# 1.5 latencies hold one or two of them, and runs at 20 ms overshot to 64 batches).
STARTUP_WINDOW = 2.0
MIN_SAMPLES = 8
# Outside startup, intervals are CALM times as long (and their window WINDOW latencies).
CALM = 2
# A startup doubling that brought this share of the proportional gain or more: the next
# step quadruples.
STEEP = 0.75
# The limit bound the interval when on average at least this share of it was in use.
BUSY = 0.8
# A step up is kept when throughput rose by at least GROW x the step's proportion (a
# doubling must bring 20% more); a step down is kept when throughput fell by at most
# SHRINK x the step's proportion. Low-ish on purpose: a few transfers too many cost little
# (a little latency), too few cost throughput, and on a busy machine throughput keeps
# rising slowly long after latency started to rise. SHRINK above GROW: where throughput
# is flat, noise must lead the limit down more often than up.
GROW = 0.2
SHRINK = 0.3
UP = 1.25
DOWN = 0.8
# Cruise intervals before the next probe once a probe was refused (the last of them is
# the measure the probe is judged against).
CRUISE = 2
# Median latency up by this factor at an unchanged limit: cut by the gradient. (A busy
# shared machine makes 1.5x swings of an interval's median common.)
LATENCY_RISE = 2.0


@dataclass(frozen=True)
class Measure:
    """One interval: the limit in force, transfers finished per second, median seconds
    per transfer."""

    limit: int
    rate: float
    latency: float


def _gain(low: Measure, high: Measure) -> float:
    """Share of the proportional throughput gain that going from `low` to `high`
    concurrency brought (1: throughput rose in step, 0: flat, negative: it fell)."""
    if low.rate <= 0 or high.limit <= low.limit:
        return 0.0
    return (high.rate / low.rate - 1) / (high.limit / low.limit - 1)


class Tuner:
    """Decides the concurrency from measured intervals; `finished` returns a new limit
    when an interval closes with a change to make."""

    def __init__(self, limit: int, minimum: int, maximum: int, now: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.limit = limit
        self.phase = "startup" if limit < maximum else "cruise"
        self.direction = 1  # of the next probe
        self.wait = 0  # cruise intervals left before the next probe
        self.last: Measure | None = None  # the previous startup level
        self.doubt = False  # the last startup step brought too little: measured again
        self.ref: Measure | None = None  # the cruise measure a probe is judged against
        self.latency = 0.0  # recent median latency: sizes the intervals
        self.settled: int | None = None
        self.intervals = 0
        self.now = now
        self._said_at: float | None = None
        self.begin(limit, now)

    # -- measuring ----------------------------------------------------------------------

    def begin(self, limit: int, now: float) -> None:
        """Start a new interval at `limit` (after any change of the limit)."""
        self.limit = limit
        self.start = now + WARMUP * self.latency
        self.samples: list[float] = []
        self.done = 0
        self.area = 0.0  # transfers in use x seconds, inside the measured window
        self._stamp = self.start

    def use(self, now: float, in_use: int) -> None:
        """Note that `in_use` transfers run from `now` on (`in_use` changed)."""
        if now > self._stamp:
            self.area += self._in_use * (now - self._stamp)
            self._stamp = now
        self._in_use = in_use

    _in_use = 0

    def abandon(self, limit: int, now: float) -> None:
        """The limit was cut for errors or a slow end: measure afresh, no startup."""
        self.phase = "cruise"
        self.ref = None
        self.wait = CRUISE
        self.direction = 1
        self.begin(limit, now)

    def finished(self, now: float, latency: float | None) -> int | None:
        """Feed one finished transfer (`latency` None: it failed without saying anything
        about the load); a new limit when this closes an interval with a change."""
        if latency is not None and not self.latency:
            # The first answer: the limit has not changed since the transfers began, so
            # the interval is measured from here on, without a warm-up (a latency sooner).
            self.latency = latency
            self.begin(self.limit, now)
            self.start = self._stamp = now
            return None
        if now < self.start:
            return None
        self.done += 1
        if latency is not None:
            self.samples.append(latency)
        # Startup wants to be quick; probes and cruise measure longer (less noise), the
        # differences they judge being smaller.
        calm = 1 if self.phase == "startup" else CALM
        window = max(MIN_WINDOW, (STARTUP_WINDOW if calm == 1 else WINDOW) * self.latency) * calm
        if now - self.start < window or len(self.samples) < calm * MIN_SAMPLES:
            return None
        self.use(now, self._in_use)
        self.now = now
        busy = self.area / (now - self.start) >= BUSY * self.limit
        measure = Measure(
            self.limit, self.done / (now - self.start), statistics.median(self.samples)
        )
        self.latency = measure.latency
        log.debug(
            "concurrency %d (%s): %.0f/s, %.0f ms median, %.1f in use on average",
            self.limit,
            self.phase,
            measure.rate,
            measure.latency * 1000,
            self.area / (now - self.start),
        )
        if not busy:
            # Fewer transfers ran than allowed: this interval says nothing about the limit.
            self.begin(self.limit, now)
            return None
        self.intervals += 1
        new = self._decide(measure)
        if new is not None:
            new = min(self.maximum, max(self.minimum, new))
        if new is None or new == self.limit:
            self.begin(self.limit, now)
            return None
        self.begin(new, now)
        return new

    # -- deciding ---------------------------------------------------------------------

    def _decide(self, m: Measure) -> int | None:
        if self.phase == "startup":
            return self._startup(m)
        if self.phase == "probe":
            return self._judge_probe(m)
        return self._cruise(m)

    def _startup(self, m: Measure) -> int | None:
        last = self.last
        if last is not None and _gain(last, m) < GROW and not self.doubt:
            # One interval can be unlucky (a busy moment of the machine): measure again
            # before deciding that the knee is passed.
            self.doubt = True
            return None
        self.doubt = False
        self.last = m
        if last is None or _gain(last, m) >= GROW:
            if m.limit < self.maximum:
                # Throughput rose in step with the last doubling: the knee is far, go
                # twice as fast (a long link wants dozens of transfers at once).
                steep = last is not None and _gain(last, m) >= STEEP
                return m.limit * (4 if steep else 2)
            self._settle(m.limit, "the ceiling", m)
            return None
        # The knee lies between the two levels: as many transfers as the pipe holds at
        # the throughput reached, with the latency of the level below the knee.
        knee = round(m.rate * last.latency)
        knee = min(m.limit, max(last.limit, knee))
        self._settle(knee, "throughput rises no more", m)
        return knee

    def _settle(self, limit: int, why: str, m: Measure) -> None:
        self.phase = "cruise"
        self.wait = CRUISE
        self.ref = None
        self.settled = limit
        log.info(
            "concurrency settles at %d transfers (%s; %.0f/s, %.0f ms each at %d)",
            limit,
            why,
            m.rate,
            m.latency * 1000,
            m.limit,
        )

    def _cruise(self, m: Measure) -> int | None:
        ref, self.ref = self.ref, m
        if ref is not None and ref.limit == m.limit and m.latency > LATENCY_RISE * ref.latency:
            # Same limit, slower answers: the knee moved down (the target or the link got
            # busy). Follow the gradient at once.
            self.ref = None
            self.wait = CRUISE
            self.direction = -1
            new = max(m.limit // 2, round(m.limit * ref.latency / m.latency))
            # A busy shared machine can do this often: one line a minute at most.
            level = logging.INFO if m.limit - new >= 2 else logging.DEBUG
            if self._said_at is not None and self.now - self._said_at < 60:
                level = logging.DEBUG
            if level == logging.INFO:
                self._said_at = self.now
            log.log(
                level,
                "latency rose from %.0f to %.0f ms: %d concurrent transfers instead of %d",
                ref.latency * 1000,
                m.latency * 1000,
                max(new, self.minimum),
                m.limit,
            )
            return new
        self.wait -= 1
        if self.wait > 0:
            return None
        return self._probe(m)

    def _probe(self, ref: Measure) -> int | None:
        up = min(self.maximum, max(ref.limit + 1, round(ref.limit * UP)))
        down = max(self.minimum, min(ref.limit - 1, round(ref.limit * DOWN)))
        if self.direction > 0 and up == ref.limit:
            self.direction = -1
        if self.direction < 0 and down == ref.limit:
            self.direction = 1 if up > ref.limit else 0
        if self.direction == 0:
            # Floor and ceiling are one: nothing to probe.
            self.phase, self.direction, self.wait = "cruise", 1, CRUISE
            return None
        self.ref = ref
        self.phase = "probe"
        return up if self.direction > 0 else down

    def _judge_probe(self, m: Measure) -> int | None:
        ref = self.ref
        assert ref is not None
        # Up: kept if throughput rose with it; down: kept if throughput hardly fell.
        kept = _gain(ref, m) >= GROW if self.direction > 0 else _gain(m, ref) <= SHRINK
        if kept:
            # Keep going the same way from the new level.
            log.debug("concurrency probe kept: %d -> %d", ref.limit, m.limit)
            self.settled = m.limit
            return self._probe(m) or None
        self.phase = "cruise"
        self.direction = -self.direction
        self.wait = CRUISE
        self.ref = None
        return ref.limit
