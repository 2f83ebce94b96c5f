"""Throttling: how fast a run may go, and when.

Three brakes, applied by one `Gate` that the scheduler awaits before every transfer:

- limits: ``--max-rate`` (instances per second) and ``--max-bandwidth`` (bytes per
  second), each a `TokenBucket`;
- a weekly timetable (``--window``, repeatable; syntax in `migrator.engine.timetable`): inside
  a window the run goes at the window's limits, outside every window it pauses, and
  says until when;
- adaptive concurrency (`migrator.engine.adaptive.AdaptiveLimit`): the number of transfers at
  once starts small and tunes itself towards the knee of throughput (`migrator.engine.autotune`),
  ``-c`` being the ceiling; when an end answers 5xx, times out or slows down, fewer
  transfers run at once straight away, and the log names that end (each transfer's download and
  store are timed apart). ``--fixed`` (``[throttle] adaptive = false``) runs exactly
  ``-c``.

Beside them, `MemoryBudget` (``[throttle] max_memory``) bounds the bytes of instances held
in memory at once, whatever their sizes and the concurrency (a streamed instance counts
for its buffers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING

from migrator.engine.adaptive import START, AdaptiveLimit, Legs, is_overload
from migrator.engine.timetable import (
    Limits,
    Schedule,
    Window,
    human_wait,
    parse_bandwidth,
    parse_memory,
    parse_rate,
)
from migrator.states import State

if TYPE_CHECKING:
    from migrator.config import Settings
    from migrator.ledger.store import Outcome

log = logging.getLogger("migrator")

__all__ = ["AdaptiveLimit", "Gate", "Legs", "MemoryBudget", "TokenBucket", "is_overload"]

# Re-check the timetable at least this often while paused (clock changes, DST).
MAX_PAUSE_STEP = 30.0


# -- buckets and the memory budget --------------------------------------------------------


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up (0.1 s worth, at least 1).

    A take larger than the burst is allowed and leaves the bucket in debt, so a 50 MB
    file under a 10 MB/s limit goes through and the next transfer waits 5 s.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rate: float | None = None
        self.burst = 1.0
        self.tokens = 0.0
        self.stamp = clock()
        self._lock = asyncio.Lock()
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        """Change the rate (None: unlimited); saved tokens are kept up to the new burst."""
        self._refill()
        if rate != self.rate:
            self.rate = rate
            self.burst = max(1.0, (rate or 0.0) * 0.1)
            self.tokens = min(self.tokens, self.burst) if self.rate else 0.0

    def _refill(self) -> None:
        now = self.clock()
        if self.rate:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, amount: float) -> float:
        """Seconds until `amount` (capped at the burst) may be taken; 0 if now."""
        self._refill()
        if not self.rate:
            return 0.0
        need = min(amount, self.burst)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def charge(self, amount: float) -> None:
        """Spend `amount` now, going into debt if need be (bytes, known after a send)."""
        self._refill()
        if self.rate:
            self.tokens -= amount

    async def take(self, amount: float = 1.0, stop: asyncio.Event | None = None) -> bool:
        """Wait until `amount` may be spent, then spend it; waiters are served in order.
        Returns False, spending nothing, if `stop` is set meanwhile."""
        async with self._lock:
            while (wait := self.delay(amount)) > 0:
                if stop is not None and stop.is_set():
                    return False
                # Short steps: a window change may lift or lower the rate meanwhile.
                await asyncio.sleep(min(wait, 0.5))
            self.charge(amount)
            return True


class MemoryBudget:
    """At most `limit` bytes of instance data held at once (None: no limit).

    A transfer waits until what it holds fits: a whole instance, or for an instance
    large enough to be streamed only its few chunk buffers (`streams.memory_need`), so
    memory does not depend on instance sizes. One larger than the whole budget waits
    until nothing else is held and then runs alone. First come, first served: small
    transfers cannot starve a large one. A size of 0 (unknown) never waits.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._queue: list[object] = []
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, size: int | None) -> AsyncIterator[None]:
        """Hold `size` bytes of the budget for the duration of the block."""
        need = 0 if self.limit is None or not size else min(size, self.limit)
        if not need:
            yield
            return
        assert self.limit is not None
        limit, changed, ticket = self.limit, self._changed, object()
        async with changed:
            self._queue.append(ticket)
            try:
                await changed.wait_for(
                    lambda: self._queue[0] is ticket and self.held + need <= limit
                )
            finally:
                self._queue.remove(ticket)
                changed.notify_all()
            self.held += need
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            async with changed:
                self.held -= need
                changed.notify_all()


# -- the gate ---------------------------------------------------------------------------


class Gate:
    """What the scheduler awaits before each transfer and reports to after it."""

    def __init__(
        self,
        defaults: Limits,
        schedule: Schedule,
        concurrency: int,
        stop: asyncio.Event,
        *,
        adaptive: bool = True,
        memory: int | None = None,
        clock: Callable[[], datetime] = datetime.now,
        fetch_noun: str = "downloads",
    ) -> None:
        self.defaults = defaults
        self.schedule = schedule
        self.stop = stop
        self.clock = clock
        self.instances = TokenBucket(defaults.rate)
        self.bytes = TokenBucket(defaults.bandwidth)
        self.concurrency = concurrency
        self.adaptive = (
            AdaptiveLimit(concurrency, initial=START, fetch_noun=fetch_noun) if adaptive else None
        )
        self.memory = MemoryBudget(memory)
        self.window: Window | None = None
        self.paused_seconds = 0.0
        self.pauses = 0
        self._checked = float("-inf")
        self._announced = False
        self._paused_since: float | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, stop: asyncio.Event, *, fetch_noun: str = "downloads"
    ) -> Gate:
        """A gate for the throttle settings (already validated by `config.validate`);
        `fetch_noun` names the source leg in the log ("downloads", "reads")."""
        defaults = Limits(
            parse_rate(settings.max_rate) if settings.max_rate else None,
            parse_bandwidth(settings.max_bandwidth) if settings.max_bandwidth else None,
        )
        return cls(
            defaults,
            Schedule.parse(settings.windows),
            settings.concurrency,
            stop,
            adaptive=settings.adaptive,
            memory=parse_memory(settings.max_memory),
            fetch_noun=fetch_noun,
        )

    def describe(self) -> str:
        """One line for the log at the start of a run."""
        text = f"throttle: {self.defaults.describe()}"
        if self.schedule.windows:
            text += "; windows: " + "; ".join(w.text for w in self.schedule.windows)
        return text

    @property
    def allowed(self) -> int:
        """Transfers allowed at once right now (the fixed concurrency when not adaptive)."""
        return self.adaptive.allowed if self.adaptive is not None else self.concurrency

    async def turn(self, rank: int) -> None:
        """Wait until the `rank`-th worker (0-based) may take work: workers beyond the
        adaptive limit take no leased rows while they wait."""
        if self.adaptive is not None:
            await self.adaptive.turn(rank)

    async def before(self) -> bool:
        """Wait until a transfer may start; False when the run is stopping instead."""
        if not self._announced:
            self._announced = True
            if self.defaults != Limits() or self.schedule.windows:
                log.info(self.describe())
        while not await self._window_open():
            if self.stop.is_set():
                return False
        if self.adaptive is not None:
            await self.adaptive.acquire()
        ready = await self.instances.take(1, self.stop) and await self.bytes.take(0, self.stop)
        if not ready or self.stop.is_set():
            if self.adaptive is not None:
                self.adaptive.release()
            return False
        return True

    def after(self, outcome: Outcome | None, legs: Legs) -> None:
        """Account for a finished transfer (outcome None: it raised), timed leg by leg."""
        sent = outcome is not None and outcome.state is State.SENT
        if sent:
            self.bytes.charge(outcome.size or 0)  # type: ignore[union-attr]
        if self.adaptive is not None:
            overloaded, reason = is_overload(outcome)
            # Only a success's legs say what is usual; an overload is blamed on the end
            # whose error ended the transfer (the target when unknown).
            self.adaptive.record(
                legs.store if sent else None,
                overloaded,
                reason,
                fetch=legs.fetch if sent else None,
                side=legs.failed or "target",
            )
            self.adaptive.release()

    async def _window_open(self) -> bool:
        """Apply the current window's limits; when outside every window, pause (up to
        MAX_PAUSE_STEP at a time) and return False."""
        if not self.schedule.windows:
            return True
        if time.monotonic() - self._checked < 1.0 and self._paused_since is None:
            return True
        self._checked = time.monotonic()
        now = self.clock()
        window = self.schedule.active(now)
        if window is not None:
            if self._paused_since is not None:
                self.paused_seconds += time.monotonic() - self._paused_since
                self._paused_since = None
            if window is not self.window:
                limits = window.limits(self.defaults)
                log.warning(
                    "transfer window %r open: running at %s", window.text, limits.describe()
                )
                self.window = window
                self.instances.set_rate(limits.rate)
                self.bytes.set_rate(limits.bandwidth)
            return True
        opening = self.schedule.next_opening(now)
        assert opening is not None
        wait = (opening - now).total_seconds()
        if self._paused_since is None:
            self._paused_since = time.monotonic()
            self.pauses += 1
            self.window = None
            log.warning(
                "outside the transfer windows: pausing until %s (in %s)",
                opening.strftime("%a %H:%M:%S" if opening.second else "%a %H:%M"),
                human_wait(wait),
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.05, min(wait, MAX_PAUSE_STEP)))
        return False
