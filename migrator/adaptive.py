"""Adaptive concurrency (AIMD) that names the end of a transfer that is slow.

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

from migrator.states import State

if TYPE_CHECKING:
    from migrator.ledger import Outcome

log = logging.getLogger("migrator")

# Seconds between two log lines about adaptive concurrency (debug level in between).
LOG_EVERY = 60.0
SIDES = ("source", "target")


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
    """Additive-increase / multiplicative-decrease limit on concurrent transfers.

    Each healthy transfer adds 1/limit (one more slot per `limit` transfers); an overload
    signal (5xx, 429, timeout, network error) halves the limit, a slow leg (over 3x that
    leg's usual latency and 1 s more) takes a quarter off; at most one cut per `cooldown`
    seconds, since the transfers already running all report the same trouble. Every cut
    names the end it is blamed on. `fetch_noun` says what the source leg is ("downloads"
    from an Orthanc, "reads" from a folder).
    """

    def __init__(
        self,
        maximum: int,
        minimum: int = 1,
        *,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        fetch_noun: str = "downloads",
    ) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.cooldown = cooldown
        self.clock = clock
        self.limit = float(maximum)
        self.in_use = 0
        # The usual latency of each leg, followed slowly (None until the first answer).
        self.baselines: dict[str, float | None] = dict.fromkeys(SIDES)
        self.nouns = {"source": fetch_noun, "target": "answers"}
        self.lowest = maximum
        self.cuts = 0
        self.cuts_by_side: dict[str, int] = dict.fromkeys(SIDES, 0)
        # The ends blamed for a cut since the limit was last back at its maximum.
        self._strained: list[str] = []
        self._last_cut = float("-inf")
        self._logged: dict[str, float] = {}
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def allowed(self) -> int:
        """How many transfers may run at once right now."""
        return max(self.minimum, int(self.limit))

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

    def release(self) -> None:
        """Give a slot back."""
        self.in_use -= 1
        self._wake()

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
            if not slow and (latency is not None or fetch is not None):
                self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        if self.allowed > before:
            self._wake()
            if self.allowed == self.maximum and self._strained:
                ends = " and ".join(self._strained)
                verb = "keeps" if len(self._strained) == 1 else "keep"
                self._strained.clear()
                self._say(
                    "up",
                    logging.INFO,
                    "%s %s up again: back to %d concurrent transfers",
                    ends,
                    verb,
                    self.maximum,
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
