"""How sizes are shown: IEC units (KiB, MiB, GiB: powers of 1024) everywhere the tool
prints a size or a byte rate (run summary, progress, status, inspect)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; 512 -> '512 B'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
