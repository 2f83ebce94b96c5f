"""Adaptive concurrency: self-tuning towards the knee, cuts that name the end that is slow.

The limit starts small (`START`) and `migrator.engine.autotune.Tuner` moves it towards the knee
of throughput against concurrency, never above the ceiling (``-c``). On top of that, an
overload (5xx, 429, timeouts) halves it and a leg that slows down sharply takes a quarter
off, at once; healthy answers then climb back to the level before the trouble, one
transfer more per `limit` answers (AIMD), before the tuner probes again.

A transfer has two legs: the source's download (or, for a folder, the read) and the
target's store. Each leg keeps its own usual latency, and a rise on one leg is blamed on
that end: a source that deflates every file it sends must not read as a struggling
target, and a target's answer time alone says whether the target struggles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from migrator.engine.autotune import Tuner
from migrator.states import State

if TYPE_CHECKING:
    from migrator.ledger.store import Outcome

log = logging.getLogger("migrator")

# Seconds between two log lines about adaptive concurrency (debug level in between).
LOG_EVERY = 60.0
SIDES = ("source", "target")
# The first limit of a self-tuning run (the concurrency used before it self-tuned).
START = 8


@dataclass
class Legs:
    """How one transfer went, leg by leg: seconds of the source's download (`fetch`) and
    of the target's store (`store`), None for a leg that did not finish; `failed` names
    the end whose error ended the transfer."""

    fetch: float | None = None
    store: float | None = None
    failed: str | None = None


def is_overload(outcome: Outcome | None) -> tuple[bool, str]:
    """Whether a transfer's outcome says the far end is overloaded, and a short why."""
    if outcome is None or outcome.state not in (State.PENDING, State.FAILED):
        return False, ""
    status = outcome.http_status
    if status is None:
        return True, "timeouts or network errors"
    if status == 429 or status >= 500:
        return True, f"HTTP {status}"
    return False, ""


class AdaptiveLimit:
    """The limit on concurrent transfers: self-tuned, cut on trouble.

    It starts at `initial` (default: `maximum`) and the tuner moves it between `minimum`
    and `maximum` from measured intervals (`migrator.engine.autotune`). An overload signal (5xx,
    429, timeout, network error) halves the limit, a slow leg (over 3x that leg's usual
    latency and 1 s more) takes a quarter off; at most one cut per `cooldown` seconds,
    since the transfers already running all report the same trouble. After a cut each
    healthy transfer adds 1/limit until the limit is back where it was. Every cut names
    the end it is blamed on. `fetch_noun` says what the source leg is ("downloads" from an
    Orthanc, "reads" from a folder).
    """

    def __init__(
        self,
        maximum: int,
        minimum: int = 1,
        *,
        initial: int | None = None,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        fetch_noun: str = "downloads",
    ) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.cooldown = cooldown
        self.clock = clock
        start = maximum if initial is None else min(maximum, max(self.minimum, initial))
        self.limit = float(start)
        self.start = start
        self.in_use = 0
        # The usual latency of each leg, followed slowly (None until the first answer).
        self.baselines: dict[str, float | None] = dict.fromkeys(SIDES)
        self.nouns = {"source": fetch_noun, "target": "answers"}
        self.lowest = start
        self.highest = start
        self.cuts = 0
        self.cuts_by_side: dict[str, int] = dict.fromkeys(SIDES, 0)
        # The ends blamed for a cut since the limit was last back where it was before.
        self._strained: list[str] = []
        # After a cut: the limit to climb back to (0 when not climbing back).
        self._recover_to = 0
        self.tuner = Tuner(start, self.minimum, maximum, clock())
        self._last_cut = float("-inf")
        self._logged: dict[str, float] = {}
        self._waiters: list[asyncio.Future[None]] = []
        # Workers waiting for their turn: woken only when the limit rises.
        self._turns: list[asyncio.Future[None]] = []

    @property
    def allowed(self) -> int:
        """How many transfers may run at once right now."""
        return max(self.minimum, int(self.limit))

    def try_acquire(self) -> bool:
        """Take a free slot if there is one, without waiting."""
        if self.in_use >= self.allowed:
            return False
        self.in_use += 1
        self.tuner.use(self.clock(), self.in_use)
        return True

    async def acquire(self) -> None:
        """Wait for a free slot."""
        while self.in_use >= self.allowed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.in_use += 1
        self.tuner.use(self.clock(), self.in_use)

    def release(self) -> None:
        """Give a slot back."""
        self.in_use -= 1
        self.tuner.use(self.clock(), self.in_use)
        self._wake()

    async def turn(self, rank: int) -> None:
        """Wait until the limit lets the `rank`-th worker (0-based) take work, so that
        workers beyond the limit hold no leased rows while they wait."""
        while rank >= self.allowed:
            waiter = asyncio.get_running_loop().create_future()
            self._turns.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._turns.remove(waiter)

    def _wake(self) -> None:
        # Wake everyone; each re-checks. Waiters are at most the run's workers.
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def record(
        self,
        latency: float | None,
        overloaded: bool,
        reason: str = "",
        *,
        fetch: float | None = None,
        side: str = "target",
    ) -> None:
        """Feed one transfer's result: for a success, `latency` is the target's answer
        time (its store alone) and `fetch` the source leg's time; `overloaded` is an
        overload signal from `side`, with a short `reason`."""
        before = self.allowed
        if overloaded:
            self._cut(0.5, side, reason or "errors", slow=False)
        else:
            slow = [
                (leg, seconds)
                for leg, seconds in (("source", fetch), ("target", latency))
                if seconds is not None and self._slower(leg, seconds)
            ]
            for leg, seconds in slow:
                self._cut(0.75, leg, f"{self.nouns[leg]} slowed to {seconds:.1f} s", slow=True)
            healthy = latency is not None or fetch is not None
            if healthy and not slow and self.limit < self._recover_to:
                self.limit = min(float(self._recover_to), self.limit + 1.0 / self.limit)
            elif not slow and self._recover_to == 0:
                total = (latency or 0.0) + (fetch or 0.0) if healthy else None
                tuned = self.tuner.finished(self.clock(), total)
                if tuned is not None:
                    self.limit = float(tuned)
                    self.highest = max(self.highest, tuned)
                    self.lowest = min(self.lowest, tuned)
        if self._recover_to and self.allowed >= self._recover_to:
            self._recovered()
        if self.allowed > before:
            self._wake()
            for waiter in self._turns:
                if not waiter.done():
                    waiter.set_result(None)

    def _recovered(self) -> None:
        """Back at the level before the trouble: say so, and let the tuner go on."""
        level, self._recover_to = self._recover_to, 0
        self.tuner.abandon(level, self.clock())
        if self._strained:
            ends = " and ".join(self._strained)
            verb = "keeps" if len(self._strained) == 1 else "keep"
            self._strained.clear()
            self._say(
                "up",
                logging.INFO,
                "%s %s up again: back to %d concurrent transfers",
                ends,
                verb,
                level,
            )

    def _slower(self, leg: str, latency: float) -> bool:
        """Whether `latency` is well above the leg's usual one; updates the usual one."""
        base = self.baselines[leg]
        slow = base is not None and latency > max(3 * base, base + 1.0)
        # The baseline follows the usual latency slowly, so a lasting change of pace
        # (bigger files, a busier network) becomes the new normal.
        alpha = 0.02 if slow else 0.1
        self.baselines[leg] = latency if base is None else (1 - alpha) * base + alpha * latency
        return slow

    def _cut(self, factor: float, side: str, reason: str, *, slow: bool) -> None:
        now = self.clock()
        if now - self._last_cut < self.cooldown or self.limit <= self.minimum:
            return
        before = self.allowed
        self._last_cut = now
        # Climb back to where the trouble began (not to a level reached while climbing).
        self._recover_to = max(self._recover_to, before)
        self.limit = max(float(self.minimum), self.limit * factor)
        self.cuts += 1
        self.cuts_by_side[side] = self.cuts_by_side.get(side, 0) + 1
        self.lowest = min(self.lowest, self.allowed)
        if self.allowed < before:
            if side not in self._strained:
                self._strained.append(side)
            # A slow source is slow, not necessarily struggling (it may be deflating
            # every file); a target that answers slowly or with errors struggles.
            trouble = "source slow" if side == "source" and slow else f"{side} struggling"
            self._say(
                f"cut-{side}",
                logging.WARNING,
                "%s (%s): %d concurrent transfers instead of %d",
                trouble,
                reason,
                self.allowed,
                before,
            )

    def _say(self, key: str, level: int, message: str, *args: object) -> None:
        # Random faults can cut and restore the limit every second: say it once a
        # minute at most (debug level in between), but always the first time.
        now = self.clock()
        if now - self._logged.get(key, float("-inf")) < LOG_EVERY:
            level = logging.DEBUG
        else:
            self._logged[key] = now
        log.log(level, message, *args)
