"""What the DICOMweb and DIMSE sources share: rows keyed by their three UIDs, and the
instances one series retrieval brought, kept until their own fetch takes them."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from migrator.errors import Kind, TransferError, Verdict

__all__ = [
    "CACHE_BUDGET",
    "CACHE_SECONDS",
    "SERIES_BUDGET",
    "SeriesCache",
    "series_budgets",
    "split_key",
]

T = TypeVar("T")

# Bytes one series retrieval keeps; the instances past it are retrieved one by one.
SERIES_BUDGET = 64 * 1024 * 1024
# Bytes of retrieved instances waiting for their fetch, and for how long at most.
CACHE_BUDGET = 256 * 1024 * 1024
CACHE_SECONDS = 300.0


def series_budgets(memory: int | None) -> tuple[int, int]:
    """Bytes one series retrieval keeps and bytes the cache keeps, within the run's memory
    budget (``[throttle] max_memory``, None: unlimited): a sixteenth and a quarter of it,
    `SERIES_BUDGET` and `CACHE_BUDGET` at most (which the 1 GiB default gives)."""
    if memory is None:
        return SERIES_BUDGET, CACHE_BUDGET
    return min(SERIES_BUDGET, memory // 16), min(CACHE_BUDGET, memory // 4)


def split_key(source_key: str) -> tuple[str, str, str]:
    """The study, series and SOP instance UIDs of a row's ``study/series/sop`` key.

    Any other key means the ledger's job was listed from another kind of source: fatal
    for the run, never a refusal of the instance.
    """
    parts = source_key.split("/")
    if len(parts) != 3 or not all(parts):
        raise TransferError(
            Verdict(Kind.FATAL, f"source key {source_key!r} is not study/series/SOP UIDs")
        )
    return parts[0], parts[1], parts[2]


class SeriesCache(Generic[T]):
    """Instances a series retrieval brought, until their own fetch takes them (bounded in
    bytes and age: what no fetch takes is dropped, and fetched again if ever asked).

    An instance is its bytes, or what stands for it elsewhere (a file): only bytes count
    against the budget, and `release` is called for anything dropped untaken."""

    def __init__(
        self, budget: int = CACHE_BUDGET, release: Callable[[T], None] | None = None
    ) -> None:
        self.series: OrderedDict[str, tuple[float, dict[str, T]]] = OrderedDict()
        self.bytes = 0
        self.budget = budget
        self.release = release

    def put(self, series_uid: str, found: dict[str, T]) -> None:
        """Keep what one series retrieval brought."""
        self._drop(series_uid)
        self.series[series_uid] = (time.monotonic(), found)
        self.bytes += sum(map(_held, found.values()))
        limit = time.monotonic() - CACHE_SECONDS
        while self.series and (
            self.bytes > self.budget or next(iter(self.series.values()))[0] < limit
        ):
            self._drop(next(iter(self.series)))

    def take(self, series_uid: str, sop_uid: str) -> T | None:
        """One instance, no longer kept."""
        entry = self.series.get(series_uid)
        if entry is None:
            return None
        data = entry[1].pop(sop_uid, None)
        if data is not None:
            self.bytes -= _held(data)
        if not entry[1]:
            del self.series[series_uid]
        return data

    def clear(self) -> None:
        """Drop everything (each released)."""
        while self.series:
            self._drop(next(iter(self.series)))

    def _drop(self, series_uid: str) -> None:
        entry = self.series.pop(series_uid, None)
        if entry is not None:
            self.bytes -= sum(map(_held, entry[1].values()))
            if self.release is not None:
                for data in entry[1].values():
                    self.release(data)


def _held(data: object) -> int:
    """Bytes of memory an instance kept holds."""
    return len(data) if isinstance(data, bytes) else 0
