"""A seeded fault plan mixing every kind of fault, each with its own probability, for
:class:`migrator.testkit.proxy.Proxy` (the fault tests and ``bench/fault_bench.py``).

Unlike :class:`~migrator.testkit.faults.RandomFaults` it also resets connections in the
middle of a request body, and counts what it injected per kind.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from migrator.testkit.faults import DropResponse, Fault, Reset, Stall, Status

__all__ = ["KINDS", "MixedFaults"]

KINDS = ("reset", "reset_mid_body", "503", "409", "500", "drop_response", "stall")


class MixedFaults:
    """Seeded plan: each matching request meets each fault kind with its probability.

    Kinds: reset before the body, reset in the middle of the body, 503, 409, 500, answer
    dropped after the upstream processed the request, stall (longer than the client's
    timeout). Counts what it injected per kind in `injected`.
    """

    def __init__(
        self,
        seed: int,
        p: float,
        *,
        only: tuple[str, str] = ("POST", "/instances"),
        p_stall: float | None = None,
        stall: float = 3.0,
        max_faults: int | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.only = only
        self.max_faults = max_faults
        self.injected: Counter[str] = Counter()
        self.kinds: list[tuple[str, float, Callable[[], Fault]]] = [
            ("reset", p, lambda: Reset()),
            ("reset_mid_body", p, lambda: Reset(after_body_bytes=self.rng.randint(0, 800))),
            ("503", p, lambda: Status(503)),
            ("409", p, lambda: Status(409)),
            ("500", p, lambda: Status(500)),
            ("drop_response", p, lambda: DropResponse()),
            ("stall", p if p_stall is None else p_stall, lambda: Stall(stall)),
        ]

    def __call__(self, method: str, path: str, index: int) -> Fault | None:
        want_method, prefix = self.only
        if method != want_method or not path.startswith(prefix):
            return None
        if self.max_faults is not None and sum(self.injected.values()) >= self.max_faults:
            return None
        draw = self.rng.random()
        for name, p, make in self.kinds:
            if draw < p:
                self.injected[name] += 1
                return make()
            draw -= p
        return None
