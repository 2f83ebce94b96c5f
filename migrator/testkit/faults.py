"""Fault descriptions and fault plans for :class:`migrator.testkit.proxy.Proxy`.

A *fault plan* is any callable ``plan(method, path, index) -> Fault | None`` called once
per HTTP request the proxy sees (``index`` counts requests across all connections from
0). ``None`` or :class:`Pass` forwards the request untouched.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "DropResponse",
    "Fault",
    "FaultPlan",
    "Pass",
    "RandomFaults",
    "Reset",
    "ScriptedFaults",
    "Stall",
    "Status",
    "TruncateResponse",
    "fault_label",
]


@dataclass(frozen=True, slots=True)
class Pass:
    """Forward the request normally."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Abort both connections.

    With ``after_body_bytes`` None nothing of the request reaches the upstream; otherwise
    the headers and that many body bytes are forwarded first, so the upstream sees a
    truncated request.
    """

    after_body_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """Answer with a synthetic HTTP response without forwarding the request."""

    code: int
    body: bytes | None = None
    content_type: str = "application/json"

    def render(self) -> bytes:
        """Return the complete HTTP/1.1 response bytes."""
        try:
            reason = HTTPStatus(self.code).phrase
        except ValueError:
            reason = "Injected"
        body = self.body
        if body is None:
            body = json.dumps(
                {"HttpStatus": self.code, "Message": f"{reason} (injected by testkit proxy)"}
            ).encode()
        head = (
            f"HTTP/1.1 {self.code} {reason}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n"
        )
        return head.encode("latin-1") + body


@dataclass(frozen=True, slots=True)
class DropResponse:
    """Forward the request, wait for the upstream's answer, then abort the client side.

    The upstream has processed the request; the client never learns the outcome.
    """


@dataclass(frozen=True, slots=True)
class Stall:
    """Hold the request for ``seconds`` before forwarding it."""

    seconds: float


@dataclass(frozen=True, slots=True)
class TruncateResponse:
    """Forward the request, then only the first ``after_bytes`` bytes of the answer (its
    head included), then close the client connection: a body cut short of its
    Content-Length, as a source dying mid-download sends it."""

    after_bytes: int


Fault = Pass | Reset | Status | DropResponse | Stall | TruncateResponse
FaultPlan = Callable[[str, str, int], Fault | None]


def fault_label(fault: Fault) -> str:
    """Return the key under which the proxy counts an injected fault."""
    match fault:
        case Status(code=code):
            return f"status_{code}"
        case Reset(after_body_bytes=None):
            return "reset"
        case Reset():
            return "reset_mid_body"
        case DropResponse():
            return "drop_response"
        case Stall():
            return "stall"
        case TruncateResponse():
            return "truncate_response"
        case _:
            return "pass"


@dataclass
class RandomFaults:
    """Seeded random fault plan.

    Each request matching ``only`` (a ``(method, path_prefix)`` pair, or ``None`` for all
    requests) draws one number from a ``random.Random(seed)``; the probabilities are
    stacked in the order reset, 503, 409, 500, drop, stall and must sum to at most 1.
    The sequence of decisions is reproducible; which request gets which decision follows
    the order in which requests reach the proxy. ``max_faults`` caps the total injected.
    """

    seed: int = 0
    p_reset: float = 0.0
    p_503: float = 0.0
    p_409: float = 0.0
    p_500: float = 0.0
    p_drop: float = 0.0
    p_stall: float = 0.0
    stall_seconds: float = 1.0
    only: tuple[str, str] | None = ("POST", "/instances")
    max_faults: int | None = None
    injected: int = field(default=0, init=False)
    _rng: random.Random = field(init=False, repr=False)
    _table: list[tuple[float, Fault]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        choices: list[tuple[float, Fault]] = [
            (self.p_reset, Reset()),
            (self.p_503, Status(503)),
            (self.p_409, Status(409)),
            (self.p_500, Status(500)),
            (self.p_drop, DropResponse()),
            (self.p_stall, Stall(self.stall_seconds)),
        ]
        total = sum(p for p, _ in choices)
        if total > 1.0 + 1e-9 or any(p < 0 for p, _ in choices):
            raise ValueError(f"fault probabilities must be >= 0 and sum to <= 1, got {total}")
        self._table = []
        acc = 0.0
        for p, fault in choices:
            if p > 0:
                acc += p
                self._table.append((acc, fault))

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is subject to this plan."""
        if self.only is None:
            return True
        want_method, prefix = self.only
        return (not want_method or method == want_method) and path.startswith(prefix)

    def __call__(self, method: str, path: str, index: int) -> Fault | None:
        if not self.matches(method, path):
            return None
        if self.max_faults is not None and self.injected >= self.max_faults:
            return None
        draw = self._rng.random()
        for threshold, fault in self._table:
            if draw < threshold:
                self.injected += 1
                return fault
        return None


class ScriptedFaults:
    """Apply a fixed list of faults, in order, to the requests matching ``only``.

    ``ScriptedFaults([None, DropResponse()])`` lets the first matching request through,
    drops the answer of the second and passes everything after the list is used up.
    """

    def __init__(
        self,
        faults: list[Fault | None],
        *,
        only: tuple[str, str] | None = ("POST", "/instances"),
    ) -> None:
        self.faults = list(faults)
        self.only = only
        self.position = 0

    def __call__(self, method: str, path: str, index: int) -> Fault | None:
        if self.only is not None:
            want_method, prefix = self.only
            if (want_method and method != want_method) or not path.startswith(prefix):
                return None
        if self.position >= len(self.faults):
            return None
        fault = self.faults[self.position]
        self.position += 1
        return fault
