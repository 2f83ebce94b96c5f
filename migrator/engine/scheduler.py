"""The scheduler: lists the source into the ledger, leases pending rows, transfers them with
N concurrent workers, and records every outcome in batches.

Data flow, all in one asyncio loop::

    source.listing() --pages--> ledger.save_listing
    ledger.lease() --> queue --> N workers: source.fetch -> target.store --> outcomes
    outcomes --batched--> ledger.record          heartbeat --> ledger.renew

Ledger calls run on one dedicated thread, so a slow commit never stalls the transfers.
A fatal error, a second Ctrl-C or the end of the run hand every unfinished lease back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from migrator.config import RetryPolicy, Settings
from migrator.ends.base import Source, Stored, Target, md5_hex
from migrator.ends.folder.fileclass import HELD_REASONS
from migrator.ends.streams import Body, Chunks, memory_need, streamable
from migrator.engine.batching import Batcher, BatchPolicy
from migrator.engine.deletions import DeletionPolicy, DeletionWatch
from migrator.engine.health import Breaker
from migrator.engine.progress import Progress
from migrator.engine.throttle import Gate, Legs
from migrator.engine.timetable import parse_memory
from migrator.errors import (
    FatalError,
    Kind,
    LedgerError,
    MigratorError,
    TransferError,
    Verdict,
    refused_as_not_dicom,
)
from migrator.ledger.store import Activity, Job, Lease, Ledger, Outcome
from migrator.ledger.thread import Batch, LedgerThread
from migrator.states import State

log = logging.getLogger("migrator")

FLUSH_INTERVAL = 0.25
SWITCH_INTERVAL = 0.0005
FLUSH_SIZE = 256
# Quick transfers: one lease takes the rows of this many seconds of them (at most
# LEASE_MOST). A lease costs the ledger ~1.5 ms however many rows it takes: at 2,000 small
# stores a second, leases of 32 rows took a third of the ledger thread.
LEASE_AHEAD = 0.2
LEASE_MOST = 512
# Instances of at least this many bytes are hashed on a thread.
DIGEST_ON_THREAD = 128 * 1024


@dataclass
class RunResult:
    """What one run did."""

    sent: int = 0
    bytes: int = 0
    rejected: int = 0
    failed: int = 0
    vanished: int = 0
    retries: int = 0
    listed: int = 0
    interrupted: bool = False
    fatal: str | None = None
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Endpoint outages (circuit breaker trips) and time paused outside the windows.
    outages: int = 0
    paused: float = 0.0
    # Seconds spent in each leg of the instances sent: the source's downloads (or reads)
    # and the target's stores, summed over concurrent transfers.
    fetch_seconds: float = 0.0
    store_seconds: float = 0.0


def _digest(data: bytes) -> asyncio.Future[str]:
    """The MD5 of `data`: at once when small; a large instance is hashed on another thread
    (hashlib lets go of the GIL), beside the loop's other transfers (a 0.5 MiB CT slice
    took ~0.7 ms of the loop's time)."""
    if len(data) < DIGEST_ON_THREAD:
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        done.set_result(md5_hex(data))
        return done
    return asyncio.get_running_loop().run_in_executor(None, md5_hex, data)


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full-jitter exponential backoff for the `attempt`-th failure (1-based)."""
    ceiling = min(policy.backoff_max, policy.backoff_initial * 2 ** max(attempt - 1, 0))
    return rng.uniform(ceiling / 2, ceiling)


@contextlib.contextmanager
def _quick_thread_switches() -> Iterator[None]:
    """Switch threads every 0.5 ms instead of Python's 5 ms for the duration of a run.

    The event loop answers many small transfers; the ledger and listing threads hold
    the GIL for Python-heavy stretches, and at 5 ms each of them stalls the loop.
    Measured (A/B, 8 rounds): a 2000-file import's median job time 3.23 s -> 2.92 s,
    same CPU.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


class Scheduler:
    """One run of a job in this process."""

    def __init__(
        self,
        ledger: Ledger,
        job: Job,
        source: Source,
        target: Target,
        settings: Settings,
        *,
        owner: str,
        progress: Progress,
        follow: float | None = None,
        deletions: DeletionPolicy | None = None,
    ) -> None:
        self.ledger = ledger
        self.job = job
        self.source = source
        self.target = target
        self.settings = settings
        self.owner = owner
        self.progress = progress
        # Seconds between listings of new source data (mirror); None: stop when done.
        self.follow = follow
        self.result = RunResult()
        # Mirror mode: passes over what the source deleted (`engine.deletions`).
        self.deletions = (
            DeletionWatch(self, deletions) if deletions is not None and follow else None
        )
        self.rng = random.Random()
        self.queue: asyncio.Queue[Lease] = asyncio.Queue()
        self.held: set[int] = set()
        self.stopping = asyncio.Event()
        # Wake-ups of the leaser: new rows were listed; the queue of leases runs low;
        # every leased row is settled.
        self._listed = asyncio.Event()
        self._hungry = asyncio.Event()
        self._settled = asyncio.Event()
        self.listing_done = job.listing_done
        self._skipped_at_sent: int | None = None
        self.breaker = Breaker(settings.outage_timeout, self._probe)
        # An Orthanc source is downloaded from; a folder is read.
        self._fetch_noun = "downloads" if getattr(source, "client", None) else "reads"
        self.gate = Gate.from_settings(settings, self.stopping, fetch_noun=self._fetch_noun)
        progress.concurrency = lambda: self.gate.allowed
        self._ledger_thread = LedgerThread()
        self.outcomes: Batch[Outcome] = Batch(
            self._ledger_thread,
            lambda batch: ledger.record(owner, batch, activity=self.activity()),
            size=FLUSH_SIZE,
            interval=FLUSH_INTERVAL,
            on_failure=self._not_recorded,
        )
        self._signals = 0
        self._hard_stop = asyncio.Event()
        # Workers between the gate and their outcome (leased rows wait in the queue).
        self.transferring = 0
        # Outcomes so far, and the rate of them measured for the size of leases.
        self._settled_count = 0
        self._rate = 0.0
        self._rate_at = time.monotonic()
        self._rate_count = 0
        # Several small instances per request when the round trips make it pay.
        self.batcher = Batcher(
            self, BatchPolicy(settings.batch, memory_limit=parse_memory(settings.max_memory))
        )

    async def db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a ledger call on the ledger thread."""
        return await self._ledger_thread.call(fn, *args, **kwargs)

    # -- entry points -------------------------------------------------------------------

    async def list_only(self) -> RunResult:
        """Fill the ledger from the source without sending anything (dry run)."""
        started = time.monotonic()
        await self.db(self.ledger.start_run, self.job.id, self.owner, "dry-run")
        try:
            await self._listing()
        finally:
            await self.db(self.ledger.finish_run, self.owner, "finished", job_id=self.job.id)
            self._ledger_thread.close()
        self.result.elapsed = time.monotonic() - started
        return self.result

    async def run(self) -> RunResult:
        """List (if not done yet) and transfer until every row is final, or a stop."""
        with _quick_thread_switches():
            return await self._run()

    async def _run(self) -> RunResult:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        await self.db(self.ledger.start_run, self.job.id, self.owner, self.job.kind)
        status = "finished"
        tasks: list[asyncio.Task[Any]] = []
        try:
            self.batcher.start()
            await self._refresh_progress()
            listing = asyncio.create_task(self._listing_then_prepare(), name="listing")
            tasks = [
                listing,
                asyncio.create_task(self._leaser(listing), name="leaser"),
                asyncio.create_task(self.outcomes.flush_periodically(), name="flusher"),
                asyncio.create_task(self._heartbeat(), name="heartbeat"),
            ]
            workers = [
                asyncio.create_task(self._worker(i), name=f"worker-{i}")
                for i in range(self.settings.concurrency)
            ]
            await self._supervise(tasks, workers)
        except MigratorError as exc:
            self.result.fatal = str(exc)
            status = "fatal"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.result.interrupted and status == "finished":
                status = "interrupted"
            try:
                await self.outcomes.flush()
                await self.db(self.ledger.finish_run, self.owner, status, job_id=self.job.id)
            except MigratorError as exc:
                self.result.fatal = self.result.fatal or str(exc)
            self._remove_signals(loop)
            self.breaker.close()
            self.result.outages = self.breaker.outages
            self.result.paused = self.gate.paused_seconds
            self._ledger_thread.close()
        self.result.elapsed = time.monotonic() - started
        self._log_legs()
        return self.result

    def _log_legs(self) -> None:
        """Say which end the time went to, so that a slow run names its slow end."""
        r = self.result
        if r.sent:
            log.info(
                "per instance sent: source %s %.3f s, target stores %.3f s (averages)",
                self._fetch_noun,
                r.fetch_seconds / r.sent,
                r.store_seconds / r.sent,
            )

    # -- listing ------------------------------------------------------------------------

    async def _listing(self) -> None:
        """List the source into the ledger unless that is done. With several workers on
        one job, only the holder of the listing lease lists; the others wait for it (and
        take over, from the saved cursor, if it dies)."""
        lease = self.settings.lease_seconds
        while not self.listing_done and not self.stopping.is_set():
            if await self.db(self.ledger.claim_listing, self.job.id, self.owner, lease):
                try:
                    await self._list_pages()
                except TransferError as exc:
                    raise FatalError(f"listing the source failed: {exc.verdict.reason}") from None
                if self.listing_done:
                    await self.db(self.ledger.release_listing, self.job.id, self.owner)
                return
            await self._sleep(1.0)
            self.listing_done, _ = await self.db(self.ledger.listing_state, self.job.id)

    async def _list_pages(self) -> None:
        _, cursor = await self.db(self.ledger.listing_state, self.job.id)
        renewed = time.monotonic()
        async for page in self.source.listing(cursor):
            if self.stopping.is_set():
                return
            added = await self.db(
                self.ledger.save_listing,
                self.job.id,
                page.rows,
                page.cursor,
                done=page.done,
                changes_seq=page.changes_seq,
            )
            self.result.listed += added
            self.result.notes.extend(page.notes)
            if added:
                self._listed.set()
                self.progress.add_total(added.to_send)
            if page.done:
                self.listing_done = True
            elif time.monotonic() - renewed > self.settings.lease_seconds / 3:
                renewed = time.monotonic()
                await self.db(
                    self.ledger.claim_listing, self.job.id, self.owner, self.settings.lease_seconds
                )

    async def _listing_then_prepare(self) -> None:
        try:
            await self._listing()
        finally:
            self._listed.set()  # the leaser sees the end of the listing at once
        if self.listing_done and self.source.copies_possible:
            # Files without pixel data were held back while the folder was listed: only
            # the whole listing tells a header-only copy from an instance to send.
            released = await self.db(self.ledger.settle_held_copies, self.job.id, HELD_REASONS)
            if released:
                self.progress.add_total(released)  # rows to send now
            self._listed.set()
        await self._skip_copies()
        while self.follow is not None and not self.stopping.is_set():
            # Mirror mode: keep listing what the source receives, every `follow` seconds.
            await self._sleep(self.follow)
            if self.stopping.is_set():
                # Reopened now, the listing would be left unfinished in the ledger.
                break
            await self.db(self.ledger.reopen_listing, self.job.id)
            self.listing_done = False
            await self._listing()
            if self.deletions is not None and not self.stopping.is_set():
                await self.deletions.tick()

    async def _skip_copies(self) -> None:
        # Only a send makes another copy superseded: after the first pass, the (whole-job)
        # query runs again only if this run sent something since, not at every idle turn
        # of the leaser while retries wait out their backoff.
        if not (self.listing_done and self.source.copies_possible):
            return
        if self._skipped_at_sent == self.result.sent:
            return
        self._skipped_at_sent = self.result.sent
        superseded = await self.db(self.ledger.skip_superseded, self.job.id)
        if superseded:
            self.progress.add_total(-superseded)

    # -- leasing and transfers ----------------------------------------------------------

    def _queue_depth(self) -> int:
        """Rows the queue should hold: one per worker the concurrency allows now, or one
        batch per such worker (not one per worker started: with a self-tuning limit far
        below its ceiling, rows leased ahead would sit idle, in flight)."""
        return min(self.gate.allowed * self.batcher.policy.planned, 2048)

    def _lease_size(self) -> int:
        """Rows one lease takes: two queue depths (at least 32), or, when transfers are
        quick, those of `LEASE_AHEAD` seconds at the rate measured since the last lease
        (at most `LEASE_MOST`): slow transfers keep few rows in flight ahead."""
        now = time.monotonic()
        elapsed = now - self._rate_at
        if elapsed >= 0.1:
            self._rate = (self._settled_count - self._rate_count) / elapsed
            self._rate_at, self._rate_count = now, self._settled_count
        ahead = min(int(self._rate * LEASE_AHEAD), LEASE_MOST)
        return max(2 * self._queue_depth(), 32, ahead)

    async def _leaser(self, listing: asyncio.Task[None]) -> None:
        last_reclaim = 0.0
        while not self.stopping.is_set():
            batch = self._lease_size()
            await self.breaker.wait_healthy()
            if not (self.source.send_while_listing or listing.done()):
                await self._wait(self._listed, 1.0)
                continue
            if self.queue.qsize() >= self._queue_depth():
                # Woken by a worker as soon as the queue runs low.
                self._hungry.clear()
                if self.queue.qsize() >= self._queue_depth():
                    await self._wait(self._hungry, 1.0)
                continue
            if time.monotonic() - last_reclaim > min(self.settings.lease_seconds / 2, 5.0):
                last_reclaim = time.monotonic()
                await self.db(self.ledger.reclaim_dead_local, self.job.id)
                await self.db(self.ledger.reclaim_expired, self.job.id)
            # Cleared before leasing, so rows saved from now on wake the wait below.
            self._listed.clear()
            leases = await self.db(
                self.ledger.lease,
                self.job.id,
                self.owner,
                batch,
                self.settings.lease_seconds,
                one_per_instance=self.source.copies_possible,
            )
            if leases.superseded:
                self.progress.add_total(-leases.superseded)
            for lease in leases:
                self.held.add(lease.id)
                self.queue.put_nowait(lease)
            if leases:
                continue
            if not listing.done():
                # Woken as soon as the listing saves new rows; the timeout picks up
                # retries coming due and rows other workers hand back.
                await self._wait(self._listed, 1.0)
                continue
            if listing.exception() is not None:
                return
            if self.held:
                # Woken when the last leased row is settled.
                self._settled.clear()
                if self.held:
                    await self._wait(self._settled, 1.0)
                continue
            await self.outcomes.flush()
            # Copies held back while their twin was in flight are settled now.
            await self._skip_copies()
            due = await self.db(self.ledger.next_due, self.job.id)
            if due is None:
                _, in_flight = await self.db(self.ledger.active_rows, self.job.id)
                if not in_flight:
                    return
                # Other workers hold rows: stay, in case they die and their rows come back.
                await self.db(self.ledger.reclaim_dead_local, self.job.id)
                await self.db(self.ledger.reclaim_expired, self.job.id)
                await self._sleep(0.5)
                continue
            await self._sleep(min(max(due - time.time(), 0.05), 1.0))

    async def _worker(self, rank: int) -> None:
        while True:
            # Workers beyond the concurrency allowed now take no rows meanwhile.
            await self.gate.turn(rank)
            lease = await self.queue.get()
            if self.queue.qsize() < self._queue_depth():
                self._hungry.set()
            if self.stopping.is_set():
                self.queue.task_done()
                continue
            together = await self.batcher.gather(lease)
            if together:
                try:
                    await self.batcher.run([lease, *together])
                finally:
                    for _ in range(len(together) + 1):
                        self.queue.task_done()
                continue
            await self.breaker.wait_healthy()
            # Throttle hook: rate, bandwidth, time windows and adaptive concurrency.
            if not await self.gate.before():
                self.queue.task_done()  # stopping: the lease is handed back at the end
                continue
            outcome: Outcome | None = None
            # Each leg is timed apart, so that a slow source is not taken for a slow
            # target (the wait for the memory budget is neither).
            legs = Legs()
            self.transferring += 1
            try:
                async with self.gate.memory.hold(memory_need(lease.size)):
                    outcome = await self._transfer(lease, legs)
                self._add_outcome(outcome, legs)
            finally:
                self.transferring -= 1
                self.gate.after(outcome, legs)
                self.queue.task_done()

    async def _transfer(self, lease: Lease, legs: Legs) -> Outcome:
        """Fetch one leased instance and store it on the target, filling in `legs`."""
        side = "source"
        try:
            started = time.monotonic()
            if lease.size is None or streamable(lease.size):
                # Large or unknown: the source says whether it comes whole or in chunks.
                payload = await self.source.open(lease)
                if not isinstance(payload, bytes):
                    return await self._stream(lease, payload, legs, started)
                data = payload
            else:
                data = await self.source.fetch(lease)
            legs.fetch = time.monotonic() - started
            self.breaker.success("source")
            digest: str | None = None
            digesting: asyncio.Future[str] | None = None
            if lease.md5:
                # The file is checked before anything is sent.
                digest = await _digest(data)
                if lease.md5 != digest:
                    return Outcome(
                        lease.id,
                        State.REJECTED,
                        error=f"source file corrupt: MD5 {digest} differs from expected "
                        f"{lease.md5}",
                    )
            elif self.target.byte_proof:
                # Only recorded, for `verify` to compare with the target's copy: hashed
                # while the target stores the instance. A target without byte proof (a
                # DIMSE peer wraps the dataset in a file meta of its own) is never compared
                # so, and the file is not hashed (1 GB of CT slices to a storescp: 1.6 s
                # of 5.4 s of CPU).
                digesting = _digest(data)
            side = "target"
            started = time.monotonic()
            stored = await self.target.store(data)
            legs.store = time.monotonic() - started
            self.breaker.success("target")
            if digesting is not None:
                digest = await digesting
        except TransferError as exc:
            legs.failed = side
            return self._failure(lease, exc.verdict, side)
        return self._sent(lease, stored, digest, len(data))

    async def _stream(self, lease: Lease, chunks: Chunks, legs: Legs, started: float) -> Outcome:
        """Stream a large instance from the source into the target (`migrator.ends.streams`):
        its MD5 and length are checked before the target receives the last byte, so a
        corrupt or cut source fails the transfer and nothing is stored."""
        legs.fetch = time.monotonic() - started
        self.breaker.success("source")
        body = Body(chunks, lease.md5, lease.source_key, record=self.target.byte_proof)
        try:
            stored = await self.target.store_stream(body)
            if not body.complete:
                # An answer before the whole body was sent confirms nothing.
                raise TransferError(
                    Verdict(Kind.RETRYABLE, "target answered before receiving the whole file")
                )
        except TransferError as exc:
            # Whoever failed first: a source failure surfaces through the upload.
            side = "source" if body.failure is not None else "target"
            legs.failed = side
            return self._failure(lease, (body.failure or exc).verdict, side)
        finally:
            await chunks.aclose()
        # The legs overlap: the source's share is the wait for its chunks.
        legs.fetch += body.source_seconds
        legs.store = max(time.monotonic() - started - legs.fetch, 0.0)
        self.breaker.success("target")
        return self._sent(lease, stored, body.md5, body.length)

    def _sent(self, lease: Lease, stored: Stored, digest: str | None, size: int) -> Outcome:
        """The outcome of an instance the target confirmed."""
        # A file the listing could not identify has only the ID the target gave it.
        target_id = stored.orthanc_id if lease.orthanc_id is None else None
        if lease.orthanc_id and stored.orthanc_id and stored.orthanc_id != lease.orthanc_id:
            # Recorded, so that verify asks the target for the instance it really holds.
            target_id = stored.orthanc_id
            log.warning(
                "%s stored as %s, not %s: does the target change identifiers on ingest?",
                lease.source_key,
                stored.orthanc_id,
                lease.orthanc_id,
            )
        return Outcome(
            lease.id,
            State.SENT,
            target_status=stored.status,
            md5=digest,
            size=size,
            target_id=target_id,
        )

    def _failure(self, lease: Lease, verdict: Verdict, side: str) -> Outcome:
        if verdict.kind is Kind.FATAL:
            raise FatalError(verdict.reason)
        # A row without Orthanc ID is a file the listing could not identify: the target
        # saying it is not DICOM settles it as skipped, not as a refused instance.
        not_dicom = refused_as_not_dicom(verdict) if lease.orthanc_id is None else None
        if not_dicom is not None and side == "target":
            log.info("skipped %s: %s", lease.source_key, not_dicom)
            return Outcome(
                lease.id, State.SKIPPED, http_status=verdict.http_status, error=not_dicom
            )
        if verdict.kind is Kind.PERMANENT:
            log.warning("rejected %s: %s", lease.source_key, verdict.reason)
            return Outcome(
                lease.id,
                State.REJECTED,
                http_status=verdict.http_status,
                error=verdict.reason,
                target_status="FilteredOut" if verdict.reason.startswith("FilteredOut") else None,
            )
        if verdict.kind is Kind.VANISHED:
            log.warning("vanished %s: %s", lease.source_key, verdict.reason)
            return Outcome(
                lease.id, State.VANISHED, http_status=verdict.http_status, error=verdict.reason
            )
        outage = verdict.http_status is None and self.breaker.failure(side)
        if outage:
            # The endpoint is down, not the instance at fault: no attempt is charged.
            return Outcome(lease.id, State.PENDING, error=verdict.reason, refund=True)
        if lease.attempts >= self.settings.retry.max_attempts:
            log.warning(
                "failed %s after %d attempts: %s", lease.source_key, lease.attempts, verdict.reason
            )
            return Outcome(
                lease.id, State.FAILED, http_status=verdict.http_status, error=verdict.reason
            )
        delay = backoff_delay(lease.attempts, self.settings.retry, self.rng)
        log.info("retrying %s in %.1fs: %s", lease.source_key, delay, verdict.reason)
        self.result.retries += 1
        return Outcome(
            lease.id,
            State.PENDING,
            http_status=verdict.http_status,
            error=verdict.reason,
            next_attempt_at=time.time() + delay,
        )

    def _add_outcome(self, outcome: Outcome, legs: Legs) -> None:
        self.outcomes.add(outcome)
        self._settled_count += 1
        self.held.discard(outcome.id)
        if not self.held:
            self._settled.set()
        result = self.result
        if outcome.state is State.SENT:
            result.sent += 1
            result.bytes += outcome.size or 0
            result.fetch_seconds += legs.fetch or 0.0
            result.store_seconds += legs.store or 0.0
        elif outcome.state is State.REJECTED:
            result.rejected += 1
        elif outcome.state is State.FAILED:
            result.failed += 1
        elif outcome.state is State.VANISHED:
            result.vanished += 1
        if outcome.state is not State.PENDING:
            self.progress.advance(outcome.state, outcome.size or 0)

    # -- bookkeeping tasks --------------------------------------------------------------

    def _not_recorded(self, batch: list[Outcome], exc: Exception) -> None:
        if not isinstance(exc, LedgerError):
            return
        # Nothing of this batch was recorded: its rows stay in flight under this run,
        # and the next run redoes them (the target answers AlreadyStored).
        lost = [o for o in batch if o.state is State.SENT]
        self.result.sent -= len(lost)
        self.result.bytes -= sum(o.size or 0 for o in lost)
        raise LedgerError(
            f"{exc} ({len(batch)} outcomes not recorded: rerun to redo them)"
        ) from None

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            await self.db(
                self.ledger.renew,
                self.owner,
                self.settings.lease_seconds,
                job_id=self.job.id,
                activity=self.activity(),
            )

    def activity(self) -> Activity:
        """Transfers under way and the concurrency allowed now (for `status`)."""
        adaptive = self.gate.adaptive
        allowed = adaptive.allowed if adaptive is not None else self.settings.concurrency
        return Activity(self.transferring, allowed)

    async def _refresh_progress(self) -> None:
        from migrator.ledger.queries import job_counts

        counts = await self.db(job_counts, self.ledger, self.job.id)
        self.progress.start(counts)

    async def _probe(self, side: str) -> bool:
        if side == "target":
            return await self.target.probe()
        probe = getattr(self.source, "probe", None)
        return True if probe is None else bool(await probe())

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        """Wait for `event`, at most `seconds` (a stop sets every event)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    async def _sleep(self, seconds: float) -> None:
        await self._wait(self.stopping, seconds)

    async def _supervise(
        self, tasks: list[asyncio.Task[Any]], workers: list[asyncio.Task[Any]]
    ) -> None:
        """Wait until the work is done, a task fails (re-raised) or a second signal."""
        leaser = tasks[1]
        hard_stop = asyncio.create_task(self._hard_stop.wait())
        drained: asyncio.Task[None] | None = None
        watched: set[asyncio.Task[Any]] = {*tasks, *workers, hard_stop}
        try:
            while True:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    watched.discard(task)
                    if task is hard_stop or task is drained:
                        return
                    if task.cancelled():
                        continue
                    exc = task.exception()
                    if isinstance(exc, MigratorError):
                        raise exc
                    if exc is not None:
                        raise FatalError(f"internal error in {task.get_name()}: {exc!r}") from exc
                    if task is leaser:
                        # Nothing more to lease: let the workers finish what is queued.
                        drained = asyncio.create_task(self.queue.join())
                        watched.add(drained)
        finally:
            hard_stop.cancel()
            if drained is not None:
                drained.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, hard_stop, return_exceptions=True)

    # -- signals ------------------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        self.result.interrupted = True
        self.stopping.set()
        self._listed.set()
        self._hungry.set()
        self._settled.set()
        if self._signals == 1:
            log.warning(
                "%s: finishing the transfers in flight (again to stop at once)",
                signal.Signals(sig).name,
            )
        else:
            log.warning("stopping now; unfinished instances go back to pending")
            self._hard_stop.set()
