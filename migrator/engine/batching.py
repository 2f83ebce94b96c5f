"""Batched transfers: several small instances per request each way, for long links.

On a link with a long round trip, every instance sent alone pays two round trips (the
source's download, the target's store), whatever the concurrency. Orthanc takes a ZIP in
``POST /instances`` (one answer entry per file it stored) and builds one from a list of
instance IDs with ``POST /tools/create-archive``, so k instances cost one round trip each
way instead of k.

- An Orthanc source: k leased rows -> one create-archive -> the ZIP, forwarded as it
  came -> one ZIP POST to the target. A folder: k files read -> one ZIP built here.
- Every row keeps its own outcome: each archive member is matched to its row by content
  (the Orthanc ID of the member's four identifiers, never by order or name), hashed on
  its own (MD5), and only an entry of the target's answer carrying that ID makes it
  `sent`.
- A failing batch is split until the failing instances are found: a create-archive 404
  (one instance vanished) is bisected; a member the target left out of its answer
  (refused, or anything else) goes again on its own, through the one-instance path,
  which gives it its exact verdict. Neighbours are never failed for it.

A target that stores several instances per request its own way (``store_many``: a
DICOMweb service's STOW-RS) gets the same batches: the rows are read as above (an
Orthanc source's archive is opened here, each member matched and hashed), then stored in
one ``store_many`` call whose per-instance outcomes, in order, settle each row: a
`Stored` (which the target gives only for an instance its answer names by SOP Instance
UID) makes it `sent`; an instance the answer refused or left out goes again on its own,
through the one-instance path, so that a request refused as a whole never refuses a
neighbour. A failure of the whole request is handled as a ZIP POST's.

`BatchPolicy` decides the size: ``--batch N`` forces it, ``--batch 1`` turns batching
off, and by default what an instance costs alone and in a batch decides, from the round
trips to both ends measured as the run starts (the first transfers wait for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from migrator.ends.base import Stored, md5_hex
from migrator.ends.dicomid import orthanc_id_from_dataset, orthanc_instance_id
from migrator.ends.folder.dicomhead import read_header
from migrator.engine.throttle import Legs
from migrator.errors import FatalError, Kind, TransferError, Verdict, verdict_for_store_status
from migrator.ledger.store import Lease, Outcome
from migrator.states import State

if TYPE_CHECKING:
    from migrator.engine.scheduler import Scheduler

log = logging.getLogger("migrator")

# Instances larger than this go alone: their time is the bytes, not the round trips.
SMALL = 2 * 1024 * 1024
# Bytes of instance data in one batch, at most (and a quarter of the memory budget).
MAX_BATCH_BYTES = 16 * 1024 * 1024
# Automatic choice, from what an instance costs. Each end's round trip is timed
# (`OrthancClient.round_trip`: the fastest of PROBES `GET /system`, which the server
# answers at once, so the time is the network's, not the server's load). An instance sent
# alone waits for both round trips; in a batch of k, for 1/k of them, plus what its ZIP
# member costs more (MEMBER: read, matched and hashed here). The size is the smallest
# that brings the round trips' share of an instance down to AMORTISED seconds (between
# AUTO_MIN and AUTO_MAX), and batches are used when they save an instance WORTH seconds
# or more. Measured on a shared 2-CPU machine, 2,000 small instances, -c 16/32:
# - 20 ms RTT (40 ms of round trips): one instance per request 5.2-6.9 s; batches of 8
#   4.5-5.9 s, of 16 4.2-4.6 s, of 32 4.0-4.5 s;
# - 100 ms: batches of 64 were slower than of 32 (7.5-8.5 s against 6.1-6.5 s: fewer,
#   larger transfers fill a capped link less evenly);
# - 0 ms: batches of 16 pay as well (this process's CPU 2.9 s -> 1.0 s, wall 4.1-9.9 s
#   -> 2.9-4.9 s: fewer requests), but a busy machine's loopback, through a Python test
#   proxy, can measure 5 to 15 ms per end, so WORTH stays above what that noise can
#   fake (batches from about 33 ms of round trips): on a local link, `--batch 16`.
# (Five probes instead of three cost a 100 ms link more than they brought: the first
# transfers wait for them.)
PROBES = 3
# Seconds the first transfers wait for the measure at most.
PROBE_WAIT = 5.0
MEMBER = 0.0005
AMORTISED = 0.0025
WORTH = 0.030
AUTO_MIN, AUTO_MAX = 16, 32
# A STOW-RS request costs its server far more than the instances in it (Orthanc's plugin:
# about what two single stores cost for 20 small instances), so batches pay from a
# shorter round trip (from about 10 ms), in sizes of one instance per STOW_AMORTISED
# seconds of round trips, from STOW_MIN.
STOW_WORTH = 0.008
STOW_AMORTISED = 0.001
STOW_MIN = 4
# Credentials refused: the one-instance path reports it the same way, as a fatal error.
_AUTH = (401, 403, 407)


def batch_saving(round_trips: float, size: int) -> float:
    """Seconds an instance saves in a batch of `size` rather than alone: the round trips
    (`round_trips`, both ends) it no longer waits for, less what its ZIP member costs."""
    return round_trips * (1 - 1 / size) - MEMBER


class BatchPolicy:
    """How many instances go in one request: `forced` (> 0) from ``--batch``, otherwise
    decided from the measured round trips (`planned` rows per transfer until then)."""

    def __init__(self, forced: int = 0, *, memory_limit: int | None = None) -> None:
        self.forced = forced
        self.size = forced if forced > 0 else 1
        self.decided = forced > 0
        cap = MAX_BATCH_BYTES if memory_limit is None else min(MAX_BATCH_BYTES, memory_limit // 4)
        self.max_bytes = max(cap, 1)

    def decide(
        self,
        round_trips: float,
        *,
        worth: float = WORTH,
        amortised: float = AMORTISED,
        smallest: int = AUTO_MIN,
    ) -> None:
        """Choose the size from the seconds of a transfer's round trips (both ends): the
        smallest size (from `smallest`) that leaves `amortised` seconds of round trips per
        instance, if batches of it save each instance `worth` seconds or more."""
        if self.decided:
            return
        self.decided = True
        size = max(smallest, min(AUTO_MAX, math.ceil(round_trips / amortised)))
        saved = batch_saving(round_trips, size)
        if saved >= worth:
            self.size = size
            log.info(
                "round trips take %.0f ms: sending %d small instances per request "
                "(%.0f ms less per instance)",
                round_trips * 1000,
                self.size,
                saved * 1000,
            )

    @property
    def planned(self) -> int:
        """Rows one transfer may take: the size, or while the round trips are being
        measured the smallest automatic one (the first batches then find their rows
        leased already, rather than a queue sized for one instance per transfer)."""
        return self.size if self.decided else AUTO_MIN

    def turn_off(self, reason: str) -> None:
        """Send one instance per request from now on."""
        if self.size > 1:
            log.warning("batched transfers off: %s", reason)
        self.size, self.decided = 1, True

    def eligible(self, lease: Lease) -> bool:
        """Whether a row may travel in a batch: an identified, small instance (a row
        without an Orthanc ID cannot be matched to an answer)."""
        return (
            self.size > 1
            and lease.orthanc_id is not None
            and lease.size is not None
            and lease.size <= min(SMALL, self.max_bytes)
        )


@dataclass
class _Member:
    """One instance of a batch, as it travels: its row and what was read of it."""

    lease: Lease
    md5: str
    size: int
    data: bytes | None = None  # kept only when the ZIP is built here


def member_id(data: bytes) -> str | None:
    """The Orthanc ID of a DICOM file, from its four identifiers (None: not computable)."""
    try:
        head = read_header(data)
    except Exception:  # Unsupported, or a malformed header: pydicom decides
        head = None
    if head is not None:
        if not (head.study_uid and head.series_uid and head.sop_uid):
            return None
        return orthanc_instance_id(head.patient_id, head.study_uid, head.series_uid, head.sop_uid)
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        return orthanc_id_from_dataset(ds)
    except Exception:  # anything pydicom cannot read has no ID to match
        return None


def build_zip(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A ZIP of (name, bytes), stored: DICOM pixel data rarely deflates, and the target
    then spends no CPU inflating."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


class Batcher:
    """The batched path of a scheduler's workers (the one-instance path is the
    scheduler's `_transfer`, used for the rows a batch could not settle)."""

    def __init__(self, scheduler: Scheduler, policy: BatchPolicy) -> None:
        self.s = scheduler
        self.policy = policy
        # An Orthanc source builds the archive itself; any other source's files are read
        # one by one and zipped here.
        self.rest = hasattr(getattr(scheduler.source, "client", None), "create_archive")
        # A target storing several instances per request other than by ZIP (STOW-RS).
        self.many = not hasattr(scheduler.target, "store_zip") and hasattr(
            scheduler.target, "store_many"
        )
        self.batches = 0
        self._probe: asyncio.Task[None] | None = None
        if not (hasattr(scheduler.target, "store_zip") or self.many):
            # The target stores one instance per request.
            policy.size, policy.decided = 1, True

    def start(self) -> None:
        """Measure the round trips as the run starts (unless the size is forced)."""
        if not self.policy.decided and self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._measure())

    async def gather(self, first: Lease) -> list[Lease]:
        """Rows to send with `first`, taken from the scheduler's queue (each taken row is
        marked done on the queue by `run`); rows that cannot travel in a batch are put
        back."""
        policy, queue = self.policy, self.s.queue
        if not policy.decided and self._probe is not None and not self._probe.done():
            # The first transfers wait for the decision, so that every transfer the
            # concurrency tuner measures is of one kind (batches or single instances).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._probe), PROBE_WAIT)
        if not policy.eligible(first):
            return []
        extra: list[Lease] = []
        ids = {first.orthanc_id}
        total = first.size or 0
        skipped: list[Lease] = []
        while len(extra) + 1 < policy.size and not queue.empty():
            lease = queue.get_nowait()
            size = lease.size or 0
            if (
                not policy.eligible(lease)
                or lease.orthanc_id in ids
                or total + size > policy.max_bytes
            ):
                skipped.append(lease)
                if total + size > policy.max_bytes:
                    break
                continue
            ids.add(lease.orthanc_id)
            total += size
            extra.append(lease)
        for lease in skipped:
            queue.put_nowait(lease)
            queue.task_done()  # the put counted it again
        return extra

    async def _measure(self) -> None:
        """Time both ends' round trips and let the policy decide."""
        target = self.s.target
        client = getattr(target, "client", None)
        timers = [client.round_trip(PROBES) if client is not None else _probe_time(target)]
        if self.rest:
            timers.append(self.s.source.client.round_trip(PROBES))  # type: ignore[attr-defined]
        try:
            total = sum(await asyncio.gather(*timers))
        except Exception as exc:  # an end that fails is the breaker's business, not ours
            log.debug("round trips not measured (%s): one instance per request", exc)
            total = 0.0
        if self.many:
            self.policy.decide(total, worth=STOW_WORTH, amortised=STOW_AMORTISED, smallest=STOW_MIN)
        else:
            self.policy.decide(total)

    async def run(self, leases: list[Lease]) -> None:
        """Send `leases` as batches and record each row's outcome (the caller marks them
        done on the queue)."""
        s = self.s
        await s.breaker.wait_healthy()
        if not await s.gate.before():
            return  # stopping: the leases are handed back at the end
        legs = Legs()
        outcomes: list[Outcome] = []
        s.transferring += len(leases)
        try:
            if len(leases) > 1 and not await s.gate.instances.take(len(leases) - 1, s.stopping):
                return
            async with s.gate.memory.hold(sum(lease.size or 0 for lease in leases)):
                self.batches += 1
                outcomes = await self._send(leases, legs)
            share = Legs(
                fetch=(legs.fetch or 0.0) / len(leases), store=(legs.store or 0.0) / len(leases)
            )
            for outcome in outcomes:
                s._add_outcome(outcome, share)
        finally:
            s.transferring -= len(leases)
            s.gate.after(_summary(outcomes), legs)

    async def _send(self, leases: list[Lease], legs: Legs) -> list[Outcome]:
        """Outcomes of `leases` sent as one batch, split where it fails."""
        s = self.s
        if len(leases) == 1 or self.policy.size == 1:
            return [await s._transfer(lease, Legs()) for lease in leases]
        started = time.monotonic()
        try:
            members, body, outcomes, alone = await self._fetch(leases)
        except TransferError as exc:
            return await self._fetch_failed(leases, exc, legs)
        legs.fetch = (legs.fetch or 0.0) + time.monotonic() - started
        s.breaker.success("source")
        if members and self.many:
            outcomes += await self._store_many(list(members.values()), legs, alone)
        elif members:
            outcomes += await self._store(members, body, legs, alone)
        for lease in alone:
            outcomes.append(await s._transfer(lease, Legs()))
        return outcomes

    async def _fetch_failed(
        self, leases: list[Lease], exc: TransferError, legs: Legs
    ) -> list[Outcome]:
        verdict = exc.verdict
        if verdict.http_status == 404:
            # One of the IDs is gone from the source: halve until it is found (a batch of
            # one goes the one-instance way and ends `vanished`).
            half = len(leases) // 2
            outcomes = await self._send(leases[:half], legs) + await self._send(leases[half:], legs)
            if not any(o.state is State.VANISHED for o in outcomes):
                # Every instance was there: this source does not build archives.
                self.policy.turn_off(f"the source's create-archive failed: {verdict.reason}")
            return outcomes
        if verdict.kind is Kind.RETRYABLE:
            legs.failed = "source"
            return self._failures(leases, verdict, "source")
        if verdict.kind is Kind.FATAL and verdict.http_status in _AUTH:
            raise FatalError(verdict.reason)
        # The source cannot build archives (refused, an older version): one by one.
        self.policy.turn_off(f"the source's create-archive failed: {verdict.reason}")
        return [await self.s._transfer(lease, Legs()) for lease in leases]

    def _failures(self, leases: list[Lease], verdict: Verdict, side: str) -> list[Outcome]:
        """Each row's outcome of one failed request: the scheduler decides per row
        (retry with backoff, or failed once out of attempts), but the endpoint's breaker
        counts the request once, not once per row (three in a row mean an outage)."""
        s, breaker = self.s, self.s.breaker
        first = s._failure(leases[0], verdict, side)
        outcomes = [first]
        if first.refund:  # an outage: nobody is charged an attempt
            return outcomes + [
                Outcome(lease.id, State.PENDING, error=verdict.reason, refund=True)
                for lease in leases[1:]
            ]
        count = breaker.failures.get(side, 0)
        for lease in leases[1:]:
            breaker.failures[side] = 0
            outcomes.append(s._failure(lease, verdict, side))
        breaker.failures[side] = count
        return outcomes

    async def _fetch(
        self, leases: list[Lease]
    ) -> tuple[dict[str, _Member], bytes | None, list[Outcome], list[Lease]]:
        """Read the batch: members by Orthanc ID, the ZIP to post (None: to be built),
        outcomes settled already, and rows to send alone."""
        if self.rest:
            return await self._fetch_archive(leases)
        return await self._read_files(leases)

    async def _fetch_archive(
        self, leases: list[Lease]
    ) -> tuple[dict[str, _Member], bytes | None, list[Outcome], list[Lease]]:
        client = self.s.source.client  # type: ignore[attr-defined]
        by_id = {lease.orthanc_id: lease for lease in leases}
        body = await client.create_archive([lease.source_key for lease in leases])
        members: dict[str, _Member] = {}
        outcomes: list[Outcome] = []
        rebuild = False
        try:
            archive = zipfile.ZipFile(io.BytesIO(body))
            for info in archive.infolist():
                data = archive.read(info)
                oid = member_id(data)
                lease = by_id.get(oid) if oid is not None else None
                if lease is None or oid in members:
                    rebuild = True  # not asked for: kept out of what is posted
                    continue
                digest = md5_hex(data)
                if lease.md5 and lease.md5 != digest:
                    outcomes.append(_corrupt(lease, digest))
                    rebuild = True
                    del by_id[oid]
                    continue
                members[oid] = _Member(lease, digest, len(data), data)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            # A damaged answer (cut short on the way): the rows go one by one.
            log.warning("the source's archive could not be read (%s): sending one by one", exc)
            return {}, None, [], leases
        alone = [lease for oid, lease in by_id.items() if oid not in members]
        if self.many:
            return members, None, outcomes, alone  # each member's bytes are stored
        if not rebuild:
            for member in members.values():
                member.data = None  # the archive is forwarded as it came
            return members, body, outcomes, alone
        return members, None, outcomes, alone

    async def _read_files(
        self, leases: list[Lease]
    ) -> tuple[dict[str, _Member], bytes | None, list[Outcome], list[Lease]]:
        s = self.s
        members: dict[str, _Member] = {}
        outcomes: list[Outcome] = []
        alone: list[Lease] = []
        for lease in leases:
            try:
                data = await s.source.fetch(lease)
            except TransferError as exc:
                outcomes.append(s._failure(lease, exc.verdict, "source"))
                continue
            digest = md5_hex(data)
            if lease.md5 and lease.md5 != digest:
                outcomes.append(_corrupt(lease, digest))
                continue
            oid = member_id(data)
            if oid is None or oid in members:
                alone.append(lease)  # no ID to match an answer to: alone
                continue
            members[oid] = _Member(lease, digest, len(data), data)
        return members, None, outcomes, alone

    async def _store(
        self, members: dict[str, _Member], body: bytes | None, legs: Legs, alone: list[Lease]
    ) -> list[Outcome]:
        """POST the batch; rows the answer confirms are sent, the others go to `alone`."""
        s = self.s
        if body is None:
            body = build_zip((f"{i}.dcm", m.data or b"") for i, m in enumerate(members.values()))
        for member in members.values():
            member.data = None
        started = time.monotonic()
        try:
            stored = await s.target.store_zip(body)
        except TransferError as exc:
            # The whole ZIP refused (Orthanc leaves refused files out, so this is not one
            # file's fault) or failed.
            return self._store_failed([m.lease for m in members.values()], exc, legs, alone)
        legs.store = (legs.store or 0.0) + time.monotonic() - started
        s.breaker.success("target")
        del body
        answers = {entry.orthanc_id: entry for entry in stored if entry.orthanc_id}
        outcomes: list[Outcome] = []
        for oid, member in members.items():
            entry = answers.get(oid)
            if entry is None:
                alone.append(member.lease)
                continue
            verdict = verdict_for_store_status(entry.status)
            if verdict is not None:
                outcomes.append(s._failure(member.lease, verdict, "target"))
                continue
            outcomes.append(
                Outcome(
                    member.lease.id,
                    State.SENT,
                    target_status=entry.status,
                    md5=member.md5,
                    size=member.size,
                    # The content's ID, recorded when the listing knew the row by another.
                    target_id=oid if oid != member.lease.orthanc_id else None,
                )
            )
        if stored and not answers.keys() & members.keys():
            # Every stored file came back under another ID: the target changes identifiers
            # on ingest, and only the one-instance path records what it holds.
            self.policy.turn_off("the target stores the files under other IDs")
        return outcomes

    def _store_failed(
        self, leases: list[Lease], exc: TransferError, legs: Legs, alone: list[Lease]
    ) -> list[Outcome]:
        """The outcomes of a batch whose store request failed as a whole: refused, every
        row goes alone and gets its own answer; otherwise each row takes the failure."""
        if exc.verdict.kind is Kind.PERMANENT:
            alone.extend(leases)
            return []
        legs.failed = "target"
        return self._failures(leases, exc.verdict, "target")

    async def _store_many(
        self, members: list[_Member], legs: Legs, alone: list[Lease]
    ) -> list[Outcome]:
        """Store the batch in one `store_many` request; rows whose instance the answer
        did not confirm go to `alone`."""
        s = self.s
        datas = [m.data or b"" for m in members]
        for member in members:
            member.data = None
        started = time.monotonic()
        try:
            answers = await s.target.store_many(datas)  # type: ignore[attr-defined]
        except TransferError as exc:
            # The whole request refused (no instance named) or failed.
            return self._store_failed([m.lease for m in members], exc, legs, alone)
        legs.store = (legs.store or 0.0) + time.monotonic() - started
        s.breaker.success("target")
        del datas
        if len(answers) != len(members):
            # Outcomes that cannot be paired with the instances confirm nothing.
            log.warning(
                "the target answered %d outcomes for %d instances", len(answers), len(members)
            )
            alone.extend(m.lease for m in members)
            return []
        outcomes: list[Outcome] = []
        for member, answer in zip(members, answers, strict=True):
            if isinstance(answer, Stored):
                outcomes.append(s._sent(member.lease, answer, member.md5, member.size))
            else:
                # Refused, or left out of the answer: alone, the target's answer is
                # about that instance only (a refusal never lands on a neighbour).
                alone.append(member.lease)
        return outcomes


async def _probe_time(target: object) -> float:
    """Seconds of the fastest of PROBES `probe()` calls of a target without a
    round-trip timer of its own (a DICOMweb service: a one-study QIDO-RS search)."""
    best = float("inf")
    for _ in range(PROBES):
        started = time.monotonic()
        if not await target.probe():  # type: ignore[attr-defined]
            raise TransferError(Verdict(Kind.RETRYABLE, "the target did not answer its probe"))
        best = min(best, time.monotonic() - started)
    return best


def _corrupt(lease: Lease, digest: str) -> Outcome:
    return Outcome(
        lease.id,
        State.REJECTED,
        error=f"source file corrupt: MD5 {digest} differs from expected {lease.md5}",
    )


def _summary(outcomes: list[Outcome]) -> Outcome | None:
    """One outcome standing for a batch, for the gate: sent (with the bytes sent) when
    anything was, else the first failure (its overload signal counts once)."""
    sent = [o for o in outcomes if o.state is State.SENT]
    if sent:
        return Outcome(sent[0].id, State.SENT, size=sum(o.size or 0 for o in sent))
    return outcomes[0] if outcomes else None
