"""Retrying the requests of a listing: a retryable failure is tried again after a backoff."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from migrator.config import RetryPolicy
from migrator.errors import Kind, TransferError

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
