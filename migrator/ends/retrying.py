"""Retrying requests: a retryable failure is tried again after a backoff.

`with_retries` serves the listings (it raises what is left); `check_with_retries` serves
`verify`'s questions to a target (it answers the verdict that is left, for the row's
`error`, and stops the pass when the target is gone or refuses us).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from migrator.config import RetryPolicy
from migrator.errors import FatalError, Kind, TransferError, Verdict

log = logging.getLogger("migrator")

T = TypeVar("T")


async def with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """Await `call`, retrying retryable TransferErrors with backoff (listing requests)."""
    attempt = 0
    while True:
        try:
            return await call()
        except TransferError as exc:
            attempt += 1
            if exc.verdict.kind is not Kind.RETRYABLE or attempt >= policy.max_attempts:
                raise
            ceiling = min(policy.backoff_max, policy.backoff_initial * 2 ** (attempt - 1))
            delay = random.uniform(ceiling / 2, ceiling)
            log.warning("%s failed (%s); retrying in %.1f s", what, exc.verdict.reason, delay)
            await asyncio.sleep(delay)


# Tries of one verify question, and the pauses between them.
CHECK_ATTEMPTS = 4
CHECK_BACKOFF = (0.2, 0.5, 1.0)


async def check_with_retries(
    call: Callable[[], Awaitable[T]], still_there: Callable[[], Awaitable[object]]
) -> T | Verdict:
    """`call()`'s value, trying retryable TransferErrors again, or the Verdict of the last
    failure. A fatal failure raises FatalError; after network errors only, `still_there()`
    is awaited (it raises FatalError for a target gone altogether, which must stop the
    pass rather than mark every remaining row `error`)."""
    verdict: Verdict | None = None
    for attempt in range(CHECK_ATTEMPTS):
        if attempt:
            await asyncio.sleep(CHECK_BACKOFF[min(attempt - 1, len(CHECK_BACKOFF) - 1)])
        try:
            return await call()
        except TransferError as exc:
            verdict = exc.verdict
        if verdict.kind is Kind.FATAL:
            raise FatalError(verdict.reason)
        if verdict.kind is not Kind.RETRYABLE:
            return verdict
    assert verdict is not None
    if verdict.http_status is None:
        await still_there()
    return verdict
