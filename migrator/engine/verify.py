"""`migrator verify`: ask the target whether every sent instance is there, byte for byte.

For each `sent` row the target is asked for the MD5 of the instance's DICOM attachment
(``GET /instances/{id}/attachments/dicom/md5``) and the answer is compared with the MD5
recorded when the bytes were sent. Each row gets a `VerifyResult` in the ledger::

    ledger pages (keyset on id) --> queue --> N workers: GET .../md5 --> results
    results --batched--> ledger.record_verification          (one ledger thread)

Which rows a pass asks depends on `since`: every sent row last verified before it, or
never verified since it was (last) sent, or whose check ended in `error`. A pass keeps
its `since` in the ledger, so a rerun after a crash asks only what the interrupted run
had not committed (`migrator.views.verify_report` decides when a pass begins and ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from migrator.ends.base import SentRow, Target
from migrator.errors import (
    FatalError,
)
from migrator.ledger.store import Job, Ledger
from migrator.ledger.thread import Batch, LedgerThread
from migrator.states import VerifyResult

log = logging.getLogger("migrator")

PAGE = 1000
FLUSH_INTERVAL = 0.25
FLUSH_SIZE = 500


@dataclass
class PassResult:
    """What one verification pass over one job did."""

    checked: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in VerifyResult})
    elapsed: float = 0.0
    interrupted: bool = False


def select_page(ledger: Ledger, job_id: int, after_id: int, since: float | None) -> list[SentRow]:
    """The next rows to verify after `after_id`, in id order (keyset pagination).

    Rows never verified since they were (last) sent, and rows whose check ended in
    `error`; with `since`, also rows verified before that time.
    """
    return [SentRow(*r) for r in ledger.verify_page(job_id, after_id, since, PAGE)]


class VerifyPass:
    """One verification pass over one job, in one asyncio loop."""

    def __init__(
        self,
        ledger: Ledger,
        job: Job,
        target: Target,
        *,
        concurrency: int,
        since: float | None,
        on_result: Callable[[VerifyResult], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.job = job
        self.target = target
        self.concurrency = concurrency
        self.since = since
        self.on_result = on_result
        self.result = PassResult()
        self.queue: asyncio.Queue[SentRow | None] = asyncio.Queue(maxsize=2 * PAGE)
        self._ledger_thread = LedgerThread()
        self.pending: Batch[tuple[int, VerifyResult, str | None]] = Batch(
            self._ledger_thread,
            ledger.record_verification,
            size=FLUSH_SIZE,
            interval=FLUSH_INTERVAL,
        )

    async def run(self) -> PassResult:
        """Check every selected row; results are committed in batches as they come."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None

        def on_signal() -> None:
            self.result.interrupted = True
            main.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
        try:
            async with asyncio.TaskGroup() as group:
                flusher = group.create_task(self.pending.flush_periodically())
                workers = [group.create_task(self._worker()) for _ in range(self.concurrency)]
                await self._feed()
                await asyncio.gather(*workers)
                flusher.cancel()
        except asyncio.CancelledError:
            if not self.result.interrupted:
                raise
            main.uncancel()
        except BaseExceptionGroup as group_exc:
            fatal = group_exc.subgroup(FatalError)
            raise (fatal.exceptions[0] if fatal else group_exc.exceptions[0]) from None
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            # Whatever happened, keep what was learnt: a rerun will not ask these again.
            await self.pending.flush()
            self._ledger_thread.close()
        self.result.elapsed = time.monotonic() - started
        return self.result

    async def _feed(self) -> None:
        after = 0
        while True:
            rows = await self._ledger_thread.call(
                select_page, self.ledger, self.job.id, after, self.since
            )
            for row in rows:
                await self.queue.put(row)
            if len(rows) < PAGE:
                break
            after = rows[-1].id
        for _ in range(self.concurrency):
            await self.queue.put(None)

    async def _worker(self) -> None:
        while (row := await self.queue.get()) is not None:
            result, detail = await self.target.check(row)
            self.pending.add((row.id, result, detail))
            self.result.checked += 1
            self.result.counts[result.value] += 1
            if self.on_result is not None:
                self.on_result(result)
