"""Live progress: a rich bar on a terminal, a plain line every few seconds elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from migrator.states import State
from migrator.units import human_bytes

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

log = logging.getLogger("migrator")

FINAL_COUNTED = ("sent", "rejected", "failed", "vanished")


class Progress(Protocol):
    """What the scheduler reports as it goes."""

    # Transfers the run allows at once now (self-tuned), shown with the rate; set by the
    # scheduler.
    concurrency: Callable[[], int] | None

    def start(self, counts: dict[str, int]) -> None:
        """Initial counts by state from the ledger."""

    def add_total(self, n: int) -> None:
        """`n` more rows to send were listed (negative: fewer)."""

    def advance(self, state: State, nbytes: int) -> None:
        """One row reached a final state."""

    def close(self) -> None:
        """Stop displaying."""


class _Counts:
    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.by_state: dict[str, int] = {}
        self.bytes = 0
        self.started = time.monotonic()
        self.done_at_start = 0
        self.concurrency: Callable[[], int] | None = None

    def at_once(self) -> str:
        """The concurrency in use as ", N at once", or nothing if not told."""
        return f", {self.concurrency()} at once" if self.concurrency is not None else ""

    def start(self, counts: dict[str, int]) -> None:
        self.by_state = {k: counts.get(k, 0) for k in FINAL_COUNTED}
        self.done = sum(self.by_state.values())
        self.done_at_start = self.done
        self.total = self.done + counts.get("pending", 0) + counts.get("in_flight", 0)

    def add(self, state: State, nbytes: int) -> None:
        self.done += 1
        self.by_state[state.value] = self.by_state.get(state.value, 0) + 1
        self.bytes += nbytes

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (self.done - self.done_at_start) / elapsed


class NullProgress(_Counts):
    """Counts silently."""

    def add_total(self, n: int) -> None:
        self.total += n

    def advance(self, state: State, nbytes: int) -> None:
        self.add(state, nbytes)

    def close(self) -> None:
        pass


class PlainProgress(NullProgress):
    """A log line every `interval` seconds, for logs and pipes."""

    def __init__(self, interval: float = 5.0) -> None:
        super().__init__()
        self.interval = interval
        self.last = time.monotonic()

    def advance(self, state: State, nbytes: int) -> None:
        super().advance(state, nbytes)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.emit()

    def emit(self) -> None:
        """Write one progress line."""
        rate = self.rate()
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "-"
        states = " ".join(f"{k}={v}" for k, v in self.by_state.items() if v)
        log.info(
            "progress %d/%d (%s) %.1f/s%s, %s sent this run, ETA %s",
            self.done,
            self.total,
            states or "none",
            rate,
            self.at_once(),
            human_bytes(self.bytes),
            eta,
        )

    def close(self) -> None:
        self.emit()


class BarProgress(NullProgress):
    """A rich progress bar: instances, bytes, rate, ETA."""

    def __init__(self, console: Console | None = None) -> None:
        # rich is imported only when a bar is shown (~25 ms of start-up otherwise).
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        super().__init__()
        self.bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f}/s{task.fields[at_once]}"),
            TextColumn("{task.fields[sent]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.task: TaskID | None = None

    def start(self, counts: dict[str, int]) -> None:
        super().start(counts)
        self.bar.start()
        self.task = self.bar.add_task(
            "instances",
            total=self.total,
            completed=self.done,
            rate=0.0,
            at_once=self.at_once(),
            sent=human_bytes(0),
        )

    def add_total(self, n: int) -> None:
        super().add_total(n)
        if self.task is not None:
            self.bar.update(self.task, total=self.total)

    def advance(self, state: State, nbytes: int) -> None:
        super().advance(state, nbytes)
        if self.task is not None:
            self.bar.update(
                self.task,
                completed=self.done,
                rate=self.rate(),
                at_once=self.at_once(),
                sent=human_bytes(self.bytes),
            )

    def close(self) -> None:
        self.bar.stop()


def make_progress(mode: str) -> NullProgress:
    """Pick the display: "bar", "plain", "none", or "auto" (bar on a terminal)."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "plain"
    if mode == "bar":
        return BarProgress()
    if mode == "plain":
        return PlainProgress()
    return NullProgress()
