"""Throttle settings: rates, bandwidths and the weekly timetable of transfer windows.

Every parser raises a one-line UsageError on bad input, so a typo stops the command
before anything starts.

Window syntax (the same strings in the TOML ``[throttle] windows = [...]``)::

    [DAYS] HH:MM-HH:MM[=LIMIT[,LIMIT]]

    DAYS   Mon-Fri | Sat,Sun | Fri-Mon | daily | *      (omitted: every day)
    times  local time; 24:00 allowed as an end; an end at or before the start runs past
           midnight (Mon-Fri 19:00-07:00 = Monday 19:00 to Tuesday 07:00, ..., Friday
           19:00 to Saturday 07:00); seconds optional (HH:MM:SS)
    LIMIT  unlimited | 50 | 50/s | 3000/min | 100000/h   instances per time
           10M | 10MB/s | 500K | 1Gi                    bytes per second (a size unit)

A window without ``=LIMIT`` uses ``--max-rate``/``--max-bandwidth``; a limit given in the
window replaces the global one of its kind; ``unlimited`` lifts both. When windows
overlap, the first one listed wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from migrator.errors import UsageError
from migrator.units import SIZE_RE, human_bytes, parse_bandwidth, parse_memory

if TYPE_CHECKING:
    from migrator.config import Settings

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_PER = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([a-z]+))?$", re.IGNORECASE)
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def parse_rate(text: str | float | int) -> float | None:
    """Instances per second from ``50``, ``50/s``, ``3000/min`` or ``100000/h``;
    None for ``unlimited``. Raises UsageError with one line."""
    raw = str(text).strip()
    if raw.lower() in ("unlimited", "none", "off"):
        return None
    match = _RATE_RE.match(raw)
    per = _PER.get((match.group(2) or "s").lower()) if match else None
    if match is None or per is None:
        raise UsageError(f"bad rate {raw!r}: use e.g. 50, 50/s, 3000/min or unlimited")
    value = float(match.group(1)) / per
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"bad rate {raw!r}: must be above 0 (or unlimited)")
    return value


def _is_bandwidth(text: str) -> bool:
    match = SIZE_RE.match(text.strip())
    return bool(match and (match.group(2) or match.group(4)))


def _parse_days(text: str, where: str) -> frozenset[int]:
    if text.lower() in ("daily", "*", "every", "all"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        ends = [p.strip().lower()[:3] for p in part.split("-")]
        if len(ends) > 2 or any(e not in DAYS for e in ends):
            raise UsageError(f"{where}: bad days {text!r}: use e.g. Mon-Fri, Sat,Sun or daily")
        first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(days)


def _parse_time(text: str, where: str) -> int:
    match = _TIME_RE.match(text.strip())
    if match is None:
        raise UsageError(f"{where}: bad time {text!r}: use HH:MM (24-hour clock)")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if minutes > 59 or seconds > 59 or total > 86400:
        raise UsageError(f"{where}: bad time {text!r}: from 00:00 to 24:00")
    return total


@dataclass(frozen=True)
class Limits:
    """The pace of a run: instances and bytes per second (None: no limit)."""

    rate: float | None = None
    bandwidth: float | None = None

    def describe(self) -> str:
        """'50/s, 9.5 MiB/s', or 'unlimited'."""
        parts = []
        if self.rate is not None:
            parts.append(f"{self.rate:g}/s")
        if self.bandwidth is not None:
            parts.append(f"{human_bytes(self.bandwidth)}/s")
        return ", ".join(parts) or "unlimited"


@dataclass(frozen=True)
class Window:
    """One weekly window: the days it starts on, start and end (seconds after midnight;
    end <= start runs past midnight) and the limits it sets (None: the global ones)."""

    text: str
    days: frozenset[int]
    start: int
    end: int
    rate: float | None = None
    bandwidth: float | None = None
    sets_rate: bool = False
    sets_bandwidth: bool = False

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) in seconds after Monday 00:00, for each day of the week."""
        length = (self.end - self.start) % 86400 or 86400
        return [(d * 86400 + self.start, d * 86400 + self.start + length) for d in self.days]

    def limits(self, default: Limits) -> Limits:
        """The limits inside this window, given the global ones."""
        return Limits(
            self.rate if self.sets_rate else default.rate,
            self.bandwidth if self.sets_bandwidth else default.bandwidth,
        )


def parse_window(text: str) -> Window:
    """Parse one ``[DAYS] HH:MM-HH:MM[=LIMIT[,LIMIT]]``; UsageError on bad syntax."""
    where = f"window {text!r}"
    spec, _, limit_text = str(text).partition("=")
    words = spec.split()
    if len(words) not in (1, 2) or "-" not in words[-1] or ":" not in words[-1]:
        raise UsageError(f'{where}: use e.g. "Mon-Fri 19:00-07:00" or "daily 22:00-06:00=50/s"')
    days = _parse_days(words[0], where) if len(words) == 2 else frozenset(range(7))
    start_text, _, end_text = words[-1].partition("-")
    start, end = _parse_time(start_text, where), _parse_time(end_text, where)
    if start == 86400:
        raise UsageError(f"{where}: a window cannot start at 24:00")
    if start == end:
        raise UsageError(f"{where}: start equals end (a whole day is 00:00-24:00)")
    values: dict[str, Any] = {}
    if "=" in text:
        items = [item.strip() for item in limit_text.split(",")]
        if not all(items):
            raise UsageError(f"{where}: empty limit after '='")
        for item in items:
            if item.lower() in ("unlimited", "none", "off"):
                values.update(rate=None, bandwidth=None, sets_rate=True, sets_bandwidth=True)
            elif _is_bandwidth(item):
                values.update(bandwidth=parse_bandwidth(item), sets_bandwidth=True)
            else:
                try:
                    values.update(rate=parse_rate(item), sets_rate=True)
                except UsageError:
                    raise UsageError(
                        f"{where}: bad limit {item!r}: use unlimited, 50/s, 3000/min or 10M"
                    ) from None
    return Window(str(text).strip(), days, start, end, **values)


class Schedule:
    """A list of windows; no window at all means "always open"."""

    def __init__(self, windows: list[Window]) -> None:
        self.windows = windows

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...]) -> Schedule:
        """Parse every ``--window`` text (UsageError on the first bad one)."""
        return cls([parse_window(t) for t in texts])

    def active(self, now: datetime) -> Window | None:
        """The window `now` falls in (first listed wins), None when outside all."""
        t = _week_seconds(now)
        for window in self.windows:
            for start, end in window.spans():
                # Shift by a week too: a Sunday-night window reaches into Monday.
                if start <= t < end or start <= t + 7 * 86400 < end:
                    return window
        return None

    def next_opening(self, now: datetime) -> datetime | None:
        """When the next window opens after `now` (None without windows)."""
        t = _week_seconds(now)
        waits = [
            (start - t) % (7 * 86400) or 7 * 86400
            for window in self.windows
            for start, _ in window.spans()
        ]
        if not waits:
            return None
        return now.replace(microsecond=0) + timedelta(seconds=min(waits))


def _week_seconds(now: datetime) -> int:
    return now.weekday() * 86400 + now.hour * 3600 + now.minute * 60 + now.second


def human_wait(seconds: float) -> str:
    """3725 -> '1h02m'; 42 -> '42s'."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def validate_settings(settings: Settings) -> None:
    """Parse the throttle settings once, so that bad ones fail before anything starts."""
    if settings.max_rate is not None:
        parse_rate(settings.max_rate)
    if settings.max_bandwidth is not None:
        parse_bandwidth(settings.max_bandwidth)
    parse_memory(settings.max_memory)
    Schedule.parse(settings.windows)


def settings_from_toml(table: Any) -> dict[str, Any]:
    """Settings changes from a config file's ``[throttle]`` table (UsageError if bad)."""
    if not isinstance(table, dict):
        raise UsageError("config: [throttle] must be a table")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("max_rate", "max_bandwidth", "max_memory"):
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise UsageError(f"config: throttle.{key} must be a string or a number")
            changes[key] = str(value)
        elif key == "windows":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError("config: throttle.windows must be a list of strings")
            changes["windows"] = tuple(value)
        elif key == "adaptive":
            if not isinstance(value, bool):
                raise UsageError("config: throttle.adaptive must be true or false")
            changes["adaptive"] = value
        else:
            raise UsageError(f"config: unknown key throttle.{key}")
    return changes
