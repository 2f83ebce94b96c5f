"""Endpoint health: a circuit breaker that pauses the transfers while a side is down.

Without it, an Orthanc that restarts for two minutes would burn every instance's retry
budget and leave thousands of rows `failed`. With it, a few consecutive network errors on
one side pause all workers, a probe polls ``GET /system`` until the side answers again,
and the instances caught in the outage are retried without being charged an attempt.
An outage longer than `outage_timeout` ends the run as fatal (exit 3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from migrator.errors import FatalError

log = logging.getLogger("migrator")

TRIP_AFTER = 3


class Breaker:
    """Tracks consecutive network failures per side ("source", "target")."""

    def __init__(self, outage_timeout: float, probe: Callable[[str], Awaitable[bool]]) -> None:
        self.outage_timeout = outage_timeout
        self.probe = probe
        self.failures: dict[str, int] = {}
        self.down_since: dict[str, float] = {}
        self.healthy = asyncio.Event()
        self.healthy.set()
        self.fatal: FatalError | None = None
        self.outages = 0
        self._probes: dict[str, asyncio.Task[None]] = {}

    def success(self, side: str) -> None:
        """An answer came back from `side`."""
        self.failures[side] = 0

    def failure(self, side: str) -> bool:
        """A network error on `side`; True when the side is (now) considered down."""
        if side in self.down_since:
            return True
        self.failures[side] = self.failures.get(side, 0) + 1
        if self.failures[side] < TRIP_AFTER:
            return False
        self.down_since[side] = time.monotonic()
        self.outages += 1
        self.healthy.clear()
        log.warning("%s is not answering: pausing transfers until it is back", side)
        self._probes[side] = asyncio.get_running_loop().create_task(self._watch(side))
        return True

    async def wait_healthy(self) -> None:
        """Return when no side is down; raise the FatalError of an outage that lasted."""
        while True:
            if self.fatal is not None:
                raise self.fatal
            if self.healthy.is_set():
                return
            await self.healthy.wait()

    async def _watch(self, side: str) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 10.0)
            if await self.probe(side):
                log.warning(
                    "%s answers again after %.0f s: resuming",
                    side,
                    time.monotonic() - self.down_since[side],
                )
                del self.down_since[side]
                self.failures[side] = 0
                if not self.down_since:
                    self.healthy.set()
                return
            if time.monotonic() - self.down_since[side] > self.outage_timeout:
                self.fatal = FatalError(
                    f"{side} has not answered for {self.outage_timeout:.0f} s: giving up "
                    f"(rerun the same command to resume)"
                )
                self.healthy.set()
                return

    def close(self) -> None:
        """Stop any probe still running."""
        for task in self._probes.values():
            task.cancel()
