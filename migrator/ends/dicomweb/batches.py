"""Stores that arrive together travel together: one STOW-RS request for several
instances, formed inside the target so that the engine's workers keep storing one
instance each.

At most `requests` STOW-RS requests are under way at once. A store arriving while one
is free goes out alone, at once (no added wait when the link is idle); stores arriving
while all are busy wait and leave together in the next free request, up to `most`
instances or `most_bytes`. So the batches grow with the load and the round trip: on a
long link, or a server that answers slowly, many instances share one request (a
STOW-RS of 20 small instances into Orthanc costs about what two single ones cost).

Every store still gets its own outcome (`Stored` or `TransferError`): the answer's
per-instance results are matched by SOPInstanceUID; a request that fails as a whole
gives each of its instances that failure.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from migrator.ends.base import Stored
from migrator.errors import TransferError

__all__ = ["StowBatches"]

Outcome = Stored | TransferError


class StowBatches:
    """Concurrent single stores gathered into shared requests of `send`."""

    def __init__(
        self,
        send: Callable[[list[bytes]], Awaitable[list[Outcome]]],
        *,
        requests: int = 4,
        most: int = 32,
        most_bytes: int = 16 << 20,
    ) -> None:
        self._send = send
        self._free = max(requests, 1)
        self.most = max(most, 1)
        self.most_bytes = most_bytes
        self._waiting: deque[tuple[bytes, asyncio.Future[Outcome]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        # Instances per request sent so far (for the log and the benchmark).
        self.requests_sent = 0
        self.instances_sent = 0

    async def store(self, data: bytes) -> Outcome:
        """The outcome of storing `data`, sent alone or with others waiting."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((data, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self._free and self._waiting:
            batch: list[tuple[bytes, asyncio.Future[Outcome]]] = []
            size = 0
            while self._waiting and len(batch) < self.most:
                data, future = self._waiting[0]
                if batch and size + len(data) > self.most_bytes:
                    break
                self._waiting.popleft()
                if future.done():
                    continue  # its store was cancelled (the run stops): not sent
                batch.append((data, future))
                size += len(data)
            if not batch:
                continue
            self._free -= 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[bytes, asyncio.Future[Outcome]]]) -> None:
        try:
            self.requests_sent += 1
            self.instances_sent += len(batch)
            outcomes = await self._send([data for data, _ in batch])
        except TransferError as exc:
            outcomes = [exc] * len(batch)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # fatal or unexpected: each store raises it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._free += 1
            self._pump()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def aclose(self) -> None:
        """Wait for the requests under way (their stores' callers may be gone)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
