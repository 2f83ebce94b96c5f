"""How sizes are shown: IEC units (KiB, MiB, GiB: powers of 1024) everywhere the tool
prints a size or a byte rate (run summary, progress, status, inspect); and how sizes given
by the user are read (``1Gi``, ``500M``: K/M/G/T powers of 1000, Ki/Mi/Gi/Ti of 1024),
with a one-line UsageError on bad input."""

from __future__ import annotations

import math
import re

from migrator.errors import UsageError

__all__ = ["SIZE_RE", "human_bytes", "parse_bandwidth", "parse_memory"]

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
# A size, or a byte rate (``/s``): number, unit, binary ``i``, optional ``B``.
SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)(?:/s)?$", re.IGNORECASE)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; 512 -> '512 B'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_bandwidth(text: str | float | int) -> float | None:
    """Bytes per second from ``10M`` (10 MB/s), ``500K``, ``1Gi``, ``10MB/s``, ``123``;
    None for ``unlimited``. K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024."""
    return _parse_bytes(
        text, "bandwidth", "10M (10 MB/s), 500K, 1Gi", "at least 1 byte/s", per_second=True
    )


def parse_memory(text: str | float | int) -> int | None:
    """Bytes from ``1Gi``, ``500M``, ``2G``, ``123``; None for ``unlimited``."""
    value = _parse_bytes(text, "memory limit", "1Gi, 500M", "at least 1 byte")
    return None if value is None else int(value)


def _parse_bytes(
    text: str | float | int, what: str, examples: str, minimum: str, *, per_second: bool = False
) -> float | None:
    raw = str(text).strip()
    if raw.lower() in ("unlimited", "none", "off"):
        return None
    match = SIZE_RE.match(raw)
    if (
        match is None
        or (match.group(3) and not match.group(2))
        or (raw.lower().endswith("/s") and not per_second)
    ):
        raise UsageError(f"bad {what} {raw!r}: use e.g. {examples} or unlimited")
    unit, binary = match.group(2).lower(), bool(match.group(3))
    scale = 1024 ** "kmgt".index(unit) * 1024 if binary else _UNITS[unit]
    value = float(match.group(1)) * scale
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"bad {what} {raw!r}: must be {minimum} (or unlimited)")
    return value
