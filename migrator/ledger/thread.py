"""Ledger calls from the event loop: one thread for them all, and results in batches.

A run (`scheduler`) and a verification pass (`verify`) both make many small results on
the event loop and must not wait on a commit for each. `LedgerThread` runs every ledger
call of the run on one thread (a slow commit never stalls the requests in flight, and
calls keep their order); `Batch` gathers results and writes them together, when enough
are waiting or at the latest every `interval` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, NoReturn, TypeVar

T = TypeVar("T")


class LedgerThread:
    """One thread on which every ledger call of a run is made, in order."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` on the ledger thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Wait for the calls under way, then stop the thread."""
        self._executor.shutdown(wait=True)


class Batch(Generic[T]):
    """Results waiting to be written by one `write(batch)` call on the ledger thread.

    A failed write raises from `flush` after `on_failure(batch, exc)` has been told which
    results were not written (it may raise an error of its own instead).
    """

    def __init__(
        self,
        thread: LedgerThread,
        write: Callable[[list[T]], Any],
        *,
        size: int,
        interval: float,
        on_failure: Callable[[list[T], Exception], None] | None = None,
    ) -> None:
        self.items: list[T] = []
        self._thread = thread
        self._write = write
        self._size = size
        self._interval = interval
        self._on_failure = on_failure
        self._lock = asyncio.Lock()

    def add(self, item: T) -> None:
        """Queue one result (written by the next flush)."""
        self.items.append(item)

    async def flush(self) -> None:
        """Write every queued result now (one flush at a time)."""
        async with self._lock:
            if not self.items:
                return
            batch, self.items = self.items, []
            try:
                await self._thread.call(self._write, batch)
            except Exception as exc:
                if self._on_failure is not None:
                    self._on_failure(batch, exc)
                raise

    async def flush_periodically(self) -> NoReturn:
        """Flush when `size` results wait or `interval` seconds passed (until cancelled)."""
        while True:
            deadline = time.monotonic() + self._interval
            while time.monotonic() < deadline and len(self.items) < self._size:
                await asyncio.sleep(0.02)
            await self.flush()


__all__ = ["Batch", "LedgerThread"]
