"""`migrator verify`: ask the target whether every sent instance is there, byte for byte.

For each `sent` row the target is asked for the MD5 of the instance's DICOM attachment
(``GET /instances/{id}/attachments/dicom/md5``) and the answer is compared with the MD5
recorded when the bytes were sent. Each row gets a `VerifyResult` in the ledger::

    ledger pages (keyset on id) --> queue --> N workers: GET .../md5 --> results
    results --batched--> ledger.record_verification          (one ledger thread)

Which rows a pass asks depends on `since`: every sent row last verified before it, or
never verified since it was (last) sent, or whose check ended in `error`. A pass keeps
its `since` in the ledger, so a rerun after a crash asks only what the interrupted run
had not committed (`migrator.verify_report` decides when a pass begins and ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from migrator.errors import (
    FatalError,
    Kind,
    Verdict,
    classify_exception,
    verdict_for_response,
)
from migrator.ledger import Job, Ledger
from migrator.ledgerio import Batch, LedgerThread
from migrator.orthanc import OrthancClient
from migrator.states import VerifyResult

log = logging.getLogger("migrator")

PAGE = 1000
FLUSH_INTERVAL = 0.25
FLUSH_SIZE = 500
# Per-request retries of retryable failures (network, 5xx, 409) before a row is `error`.
REQUEST_ATTEMPTS = 4
BACKOFF = (0.2, 0.5, 1.0)
# Orthanc's error code for "Unknown resource": the instance is not on the target.
UNKNOWN_RESOURCE = 17


@dataclass(frozen=True)
class Row:
    """One `sent` row to check."""

    id: int
    source_key: str
    orthanc_id: str | None
    md5: str | None
    target_status: str | None


@dataclass
class PassResult:
    """What one verification pass over one job did."""

    checked: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in VerifyResult})
    elapsed: float = 0.0
    interrupted: bool = False


def select_page(ledger: Ledger, job_id: int, after_id: int, since: float | None) -> list[Row]:
    """The next rows to verify after `after_id`, in id order (keyset pagination).

    Rows never verified since they were (last) sent, and rows whose check ended in
    `error`; with `since`, also rows verified before that time.
    """
    return [Row(*r) for r in ledger.verify_page(job_id, after_id, since, PAGE)]


async def check_instance(client: OrthancClient, row: Row) -> tuple[VerifyResult, str | None]:
    """Compare the target's copy of one instance with what was sent.

    Raises FatalError when the target refuses the credentials or stops answering.
    """
    if not row.orthanc_id:
        return VerifyResult.ERROR, "no Orthanc ID recorded for this row"
    if not row.md5:
        return VerifyResult.ERROR, "no MD5 was recorded when it was sent"
    response = await _get(client, f"instances/{row.orthanc_id}/attachments/dicom/md5")
    if isinstance(response, Verdict):
        return VerifyResult.ERROR, response.reason
    if response.status_code == 404:
        if _unknown_resource(response):
            return VerifyResult.MISSING, "not on the target"
        # The instance is there but its MD5 was not stored (StoreMD5ForAttachments false):
        # download the file and hash it.
        response = await _get(client, f"instances/{row.orthanc_id}/file")
        if isinstance(response, Verdict):
            return VerifyResult.ERROR, response.reason
        if response.status_code == 404:
            return VerifyResult.MISSING, "not on the target"
        digest = hashlib.md5(response.content, usedforsecurity=False).hexdigest()
        how = " (target stores no MD5s: compared the downloaded file)"
    else:
        digest = response.text.strip().strip('"').lower()
        how = ""
    if digest == row.md5.lower():
        return VerifyResult.MATCH, None
    detail = f"target MD5 {digest}, sent {row.md5}{how}"
    if row.target_status == "AlreadyStored":
        detail += "; the target answered AlreadyStored: it already held another version"
    return VerifyResult.DIFFER, detail


async def _get(client: OrthancClient, path: str) -> httpx.Response | Verdict:
    """GET with per-request retries; a 200/404 response, or the Verdict of a failure."""
    verdict: Verdict | None = None
    for attempt in range(REQUEST_ATTEMPTS):
        if attempt:
            await asyncio.sleep(BACKOFF[min(attempt - 1, len(BACKOFF) - 1)])
        try:
            response = await client.http.get(path)
        except httpx.HTTPError as exc:
            verdict = classify_exception(exc, side="target")
            if verdict.kind is Kind.RETRYABLE:
                continue
            raise FatalError(verdict.reason) from None
        if response.status_code in (200, 404):
            return response
        verdict = verdict_for_response(response, side="target")
        if verdict.kind is Kind.FATAL:
            raise FatalError(verdict.reason)
        if verdict.kind is not Kind.RETRYABLE:
            return verdict
    assert verdict is not None
    if verdict.http_status is None:
        # Only network errors: is the target still there at all? A dead target must stop
        # the pass (exit 3) rather than mark every remaining row `error`.
        await client.system()
    return verdict


def _unknown_resource(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(body, dict) and body.get("OrthancStatus") == UNKNOWN_RESOURCE


class VerifyPass:
    """One verification pass over one job, in one asyncio loop."""

    def __init__(
        self,
        ledger: Ledger,
        job: Job,
        client: OrthancClient,
        *,
        concurrency: int,
        since: float | None,
        on_result: Callable[[VerifyResult], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.job = job
        self.client = client
        self.concurrency = concurrency
        self.since = since
        self.on_result = on_result
        self.result = PassResult()
        self.queue: asyncio.Queue[Row | None] = asyncio.Queue(maxsize=2 * PAGE)
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
            result, detail = await check_instance(self.client, row)
            self.pending.add((row.id, result, detail))
            self.result.checked += 1
            self.result.counts[result.value] += 1
            if self.on_result is not None:
                self.on_result(result)
