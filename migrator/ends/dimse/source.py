"""A DICOM peer as a source: C-FIND listing, C-GET or C-MOVE retrieval.

Listing (Study Root): studies by C-FIND at STUDY level, then each study's series, then
each series' instances, one page of rows per few studies. The cursor keeps the StudyDate
ranges still to list and, within the current one, the last study listed (studies are
taken in StudyInstanceUID order), so that a resumed listing asks the same range again
and skips what it listed.

Date-range splitting: the first query asks every study. A STUDY-level answer that ends
other than in success (Orthanc's ``LimitFindResults`` ends it with 0xFE00 "cancelled",
other archives with 0xA700 "out of resources") or that times out is taken as capped: its
range is halved (by date) and each half asked, down to single days. A single day still
capped is listed as far as it was answered and a note says so. Studies without StudyDate
come only from an unsplit query: when the first query is capped, undated studies beyond
the cap are not listed (the note says so). A capped SERIES or IMAGE level answer cannot
be split and stops the listing (FatalError): raise the peer's limit.

Retrieval (``settings.dimse_retrieve``):

- ``get`` (default): C-GET on a pooled association that proposes the
  storage SOP classes in the SCP role (the classes the listing saw, with a context per
  common compressed transfer syntax so that the peer need not transcode, then the common
  storage classes uncompressed, 127 in all). The first row of a series asks for the
  whole series (SERIES level), whose instances wait in a bounded cache for their own rows
  (one request instead of one per instance); an instance it did not bring is then asked
  alone, at IMAGE level.
- ``move``: C-MOVE to our own storage SCP (started by `preflight`, on
  ``settings.dimse_move_port``), by series like C-GET: the first row of a series moves the
  whole series, the instances that arrive (matched to it by their SeriesInstanceUID) wait
  in the same cache, and an instance it did not bring is moved alone at IMAGE level. The
  peer must know our AE title (``settings.dimse_aet``) with our host and that port
  (Orthanc: ``DicomModalities``).

An instance is taken from a series retrieval only when it arrived whole; one retrieved
alone is done only when it arrived (matched by SOP Instance UID) and the final status
counts one completed sub-operation and no failed one. An arrival goes on in a file past
16 MiB (`scp.spill_large_arrivals`); such an instance, retrieved alone or with its
series, is kept in a file and `open` streams it from there to the target, so memory does
not grow with instance size.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from migrator.config import Settings
from migrator.ends.base import Item, ListingPage
from migrator.ends.dicomid import orthanc_instance_id
from migrator.ends.dimse.peer import MAX_ASSOCIATIONS, AssociationPool, Connector, Peer
from migrator.ends.dimse.scp import Arrivals, StorageSCP, spill_large_arrivals
from migrator.ends.dimse.wire import FIND_MODEL, find, pause_reactor, query, text
from migrator.ends.retrying import with_retries
from migrator.ends.series import SeriesCache, series_budgets, split_key
from migrator.ends.spool import Spooled, open_spooled, sweep_spool_folders, take_spooled
from migrator.ends.streams import Chunks
from migrator.errors import (
    FatalError,
    Kind,
    TransferError,
    Verdict,
    verdict_for_dimse_status,
)
from migrator.selection import Selection, StudyFields
from migrator.units import parse_memory

__all__ = ["DimseSource"]

log = logging.getLogger("migrator")

GET_MODEL = StudyRootQueryRetrieveInformationModelGet
MOVE_MODEL = StudyRootQueryRetrieveInformationModelMove
# Storage contexts one C-GET association proposes (128 at most, one for the C-GET).
MAX_STORAGE_CONTEXTS = 127
# Transfer syntaxes an instance may be stored in at the peer: each gets a context of its
# own for the SOP classes the listing saw, so that the peer sends the instance as stored.
COMPRESSED = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Studies whose series and instances are listed at once, each on a C-FIND association
# of its own. One: a peer serves few associations at once (Orthanc 4 by default, each
# held for its whole life), and listing associations held open would starve retrieval.
LIST_AHEAD = 1
# Series remembered as retrieved whole (not asked whole again in this run).
SERIES_REMEMBERED = 10_000
# Seconds the preflight's C-MOVE waits for an instance the peer said it moved.
LATE_ARRIVAL = 3.0
# The widest range a StudyDate split works with (an open bound is taken as this).
FIRST_DAY = date(1900, 1, 1)


class DimseSource:
    """A Query/Retrieve SCP listed by C-FIND and read by C-GET or C-MOVE."""

    kind = "dimse"
    send_while_listing = True
    copies_possible = False

    def __init__(self, peer: Peer, settings: Settings, selection: Selection | None = None):
        self.peer = peer
        self.display = peer.display
        self.settings = settings
        self.retrieve = settings.dimse_retrieve
        self.selection = selection or Selection()
        # One association of the peer's few is the listing's while it runs.
        size = max(1, min(settings.concurrency, MAX_ASSOCIATIONS - LIST_AHEAD))
        self.connector = Connector(peer, settings, "source", threads=size + 3)
        # Series retrieved whole and kept for their instances' fetches, within the run's
        # memory budget (`series.series_budgets`).
        most, cached = series_budgets(parse_memory(settings.max_memory))
        self.arrivals = Arrivals(most)
        spill_large_arrivals()
        opener = self._open_get if self.retrieve == "get" else self._open_move
        self.pool = AssociationPool(self.connector, opener, size)
        self.finds = AssociationPool(self.connector, self._open_find, LIST_AHEAD)
        self.scp: StorageSCP | None = None
        # Retrieval by series: instances brought and not yet taken, retrievals under way, and
        # the series retrieved whole already (most recent last).
        self.cache: SeriesCache[bytes | Spooled] = SeriesCache(cached, self.arrivals.discard)
        self.series_tasks: dict[str, asyncio.Future[None]] = {}
        self.series_done: dict[str, None] = {}
        # SOP classes seen by the listing, most recent last (C-GET contexts).
        self.sop_classes: dict[str, None] = {}
        self.page_size = max(1, settings.page_size)

    # -- checks ---------------------------------------------------------------------------

    async def preflight(self) -> str:
        """C-ECHO, and the services the run needs (C-FIND and C-GET or C-MOVE); for C-MOVE
        our storage SCP starts listening. FatalError when the peer will not serve us."""
        model = GET_MODEL if self.retrieve == "get" else MOVE_MODEL
        await asyncio.to_thread(sweep_spool_folders)
        try:
            accepted = await self.connector.run(self._echo, model)
        except TransferError as exc:
            raise FatalError(exc.verdict.reason) from None
        if FIND_MODEL not in accepted:
            raise FatalError(f"source {self.display} does not offer C-FIND (Study Root)")
        if model not in accepted:
            other = "move" if self.retrieve == "get" else "get"
            raise FatalError(
                f"source {self.display} does not offer C-{self.retrieve.upper()} (Study Root): "
                f'try [dimse] retrieve = "{other}"'
            )
        how = "C-GET"
        if self.retrieve == "move" and self.scp is None:
            scp = StorageSCP(self.peer.calling, self.settings.dimse_move_port, self.arrivals)
            try:
                port = await self.connector.run(scp.start)
            except OSError as exc:
                raise FatalError(
                    f"cannot listen on port {self.settings.dimse_move_port} for C-MOVE: {exc}"
                ) from None
            self.scp = scp
            how = f"C-MOVE to {self.peer.calling} on port {port}"
            await self._probe_move(port)
        return f"source {self.display}: DICOM peer (C-FIND, {how}; our AE {self.peer.calling})"

    async def _probe_move(self, port: int) -> None:
        """Move one instance to ourselves: a peer that does not know our AE title as a
        move destination fails every C-MOVE (Orthanc as it fails one that matches
        nothing: 0xC000), which must stop the run before any row is tried."""
        found = await self._first_instance()
        if found is None:
            return  # an empty peer: nothing will be moved either
        sop_uid = found.split("/")[2]
        self.arrivals.expect([sop_uid])
        late = False
        try:
            async with self.pool.take() as assoc:
                final = await self.connector.run(
                    _move, assoc, _image_query(found), self.peer.calling
                )
            status = int(final.Status) if final is not None and "Status" in final else None
            if status == 0 and not self.arrivals.has(sop_uid):
                late = await self._arrives_late(sop_uid)
        finally:
            arrived = self.arrivals.take([sop_uid])
            self.arrivals.discard(arrived.get(sop_uid))
        if late:
            # The peer answered before moving (Orthanc with SynchronousCMove false): its
            # final answers would say nothing of what arrived, which a move's checks need.
            raise FatalError(
                f"source {self.display} answers a C-MOVE before moving the instances: it "
                "moves asynchronously (Orthanc: set SynchronousCMove to true), or use C-GET "
                '([dimse] retrieve = "get")'
            )
        if sop_uid not in arrived:
            answer = f"status 0x{status:04X}" if status is not None else "no answer"
            raise FatalError(
                f"source {self.display} did not move an instance to us ({answer}): it must "
                f"know our AE title {self.peer.calling} at this host, port {port}"
            )

    async def _arrives_late(self, sop_uid: str) -> bool:
        """Whether an instance a C-MOVE said was moved arrives within a few seconds."""
        deadline = asyncio.get_running_loop().time() + LATE_ARRIVAL
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            if self.arrivals.has(sop_uid):
                return True
        return False

    async def _first_instance(self) -> str | None:
        """The source key of one instance of the peer, None when it holds none."""
        for study in (await self._find(query("STUDY", StudyInstanceUID="")))[0]:
            study_uid = text(study, "StudyInstanceUID")
            series_q = query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="")
            for series in (await self._find(series_q))[0]:
                series_uid = text(series, "SeriesInstanceUID")
                image_q = query(
                    "IMAGE",
                    StudyInstanceUID=study_uid,
                    SeriesInstanceUID=series_uid,
                    SOPInstanceUID="",
                )
                for image in (await self._find(image_q))[0]:
                    if text(image, "SOPInstanceUID"):
                        return f"{study_uid}/{series_uid}/{text(image, 'SOPInstanceUID')}"
        return None

    def _echo(self, model: str) -> set[str]:
        contexts = [build_context(Verification), build_context(FIND_MODEL), build_context(model)]
        assoc = self.connector.associate(contexts)
        try:
            assoc.send_c_echo()
            return {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        finally:
            if assoc.is_established:
                assoc.release()

    async def probe(self) -> bool:
        """Whether the peer answers again."""
        try:
            await self.connector.run(self._echo, FIND_MODEL)
        except TransferError:
            return False
        return True

    # -- listing --------------------------------------------------------------------------

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        """Pages of rows, study by study, from `cursor` (see the module's docstring)."""
        if cursor:
            state = json.loads(cursor)
        else:
            since, until = self.selection.since or "", self.selection.until or ""
            if self.selection.include_undated:
                # A StudyDate range matches no undated study: ask them all, `matches` selects.
                since = until = ""
            state = {"ranges": [[since, until]], "after": None}
        rows: list[dict[str, Any]] = []
        notes: list[str] = []
        while state["ranges"]:
            low, high = state["ranges"][0]
            studies, capped = await self._studies(low, high)
            if capped is not None:
                halves = split_range(low, high)
                if halves is not None:
                    log.info(
                        "source %s: studies of %s capped (%s): asking by halves",
                        self.display,
                        _range_text(low, high),
                        capped.reason,
                    )
                    if not (low or high):
                        notes.append(
                            "the peer caps C-FIND answers: studies listed by StudyDate "
                            "ranges; undated studies past the cap are not listed"
                        )
                    state["ranges"][0:1] = halves
                    state["after"] = None
                    continue
                if not studies:
                    raise TransferError(capped)
                notes.append(
                    f"StudyDate {low}: the peer capped the answer at {len(studies)} studies "
                    "and a day cannot be split: the others are not listed"
                )
            after = state["after"]
            todo = [
                s
                for s in sorted(studies, key=lambda s: text(s, "StudyInstanceUID"))
                if text(s, "StudyInstanceUID")
                and (after is None or text(s, "StudyInstanceUID") > after)
            ]
            # A few studies' series and instances asked at once (each C-FIND waits for
            # the peer's answer); the cursor moves past a group once all of it is listed.
            for at in range(0, len(todo), LIST_AHEAD):
                group = [s for s in todo[at : at + LIST_AHEAD]]
                chosen = [s for s in group if self._selected(s)]
                for study_rows in await asyncio.gather(*(self._study_rows(s) for s in chosen)):
                    rows.extend(study_rows)
                state["after"] = text(group[-1], "StudyInstanceUID")
                if len(rows) >= self.page_size:
                    yield ListingPage(rows, json.dumps(state), notes=notes)
                    rows, notes = [], []
            state["ranges"].pop(0)
            state["after"] = None
            if state["ranges"]:
                yield ListingPage(rows, json.dumps(state), notes=notes)
                rows, notes = [], []
        # The listing's association goes back to the peer, which serves few at once.
        await self.finds.aclose()
        yield ListingPage(rows, json.dumps(state), done=True, notes=notes)

    def _selected(self, study: Dataset) -> bool:
        if self.selection.empty:
            return True
        modalities = study.get("ModalitiesInStudy") or []
        if isinstance(modalities, str):
            modalities = [modalities]
        return self.selection.matches(
            StudyFields(
                study_uid=text(study, "StudyInstanceUID"),
                study_date=text(study, "StudyDate") or None,
                modalities=tuple(str(m) for m in modalities if m),
                accession=text(study, "AccessionNumber") or None,
                patient_id=text(study, "PatientID"),
            )
        )

    async def _studies(self, low: str, high: str) -> tuple[list[Dataset], Verdict | None]:
        """The studies of a StudyDate range, and why the answer was cut short, if it was."""
        q = query(
            "STUDY",
            StudyInstanceUID="",
            StudyDate=f"{low}-{high}" if (low or high) else "",
            PatientID="",
            AccessionNumber="",
            ModalitiesInStudy="",
        )
        matches, verdict = await self._find(q)
        if verdict is not None and verdict.kind is Kind.FATAL:
            raise FatalError(verdict.reason)
        return matches, verdict

    async def _study_rows(self, study: Dataset) -> list[dict[str, Any]]:
        """Ledger rows of every instance of one study."""
        study_uid = text(study, "StudyInstanceUID")
        patient_id = text(study, "PatientID") if "PatientID" in study else None
        study_date = text(study, "StudyDate") or None
        series_q = query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="")
        series_list = await self._complete_find(series_q, f"series of study {study_uid}")
        rows: list[dict[str, Any]] = []
        for series in series_list:
            series_uid = text(series, "SeriesInstanceUID")
            if not series_uid:
                continue
            image_q = query(
                "IMAGE",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                SOPInstanceUID="",
                SOPClassUID="",
            )
            images = await self._complete_find(image_q, f"instances of series {series_uid}")
            for image in images:
                sop_uid = text(image, "SOPInstanceUID")
                if not sop_uid:
                    continue
                sop_class = text(image, "SOPClassUID")
                if sop_class:
                    self.sop_classes.pop(sop_class, None)
                    self.sop_classes[sop_class] = None
                rows.append(
                    {
                        "source_key": f"{study_uid}/{series_uid}/{sop_uid}",
                        "sop_uid": sop_uid,
                        "study_uid": study_uid,
                        "series_uid": series_uid,
                        "study_date": study_date,
                        "orthanc_id": orthanc_instance_id(
                            patient_id, study_uid, series_uid, sop_uid
                        )
                        if patient_id is not None
                        else None,
                    }
                )
        return rows

    async def _complete_find(self, q: Dataset, what: str) -> list[Dataset]:
        """A C-FIND that must be answered whole (no range to split it by)."""
        matches, verdict = await self._find(q)
        if verdict is None:
            return matches
        if verdict.kind is Kind.RETRYABLE and verdict.reason.endswith("cancelled"):
            raise FatalError(
                f"source {self.display} capped the C-FIND answer for the {what} at "
                f"{len(matches)}: raise the peer's limit (Orthanc: LimitFindInstances)"
            )
        raise TransferError(verdict)

    async def _find(self, q: Dataset) -> tuple[list[Dataset], Verdict | None]:
        """One C-FIND over the listing's association, retried while it cannot be opened."""

        async def once() -> tuple[list[Dataset], Verdict | None]:
            async with self.finds.take() as assoc:
                return await self.connector.run(find, assoc, q, "source")

        return await with_retries(once, self.settings.retry, "source C-FIND")

    def _open_find(self, extra: bool = False) -> Association:
        return self.connector.associate([build_context(FIND_MODEL)], extra=extra)

    # -- retrieval ------------------------------------------------------------------------

    async def fetch(self, item: Item) -> bytes:
        """The instance as a Part-10 file, retrieved by C-GET or C-MOVE."""
        data = await self._retrieve(item)
        return await take_spooled(data) if isinstance(data, Spooled) else data

    async def open(self, item: Item) -> bytes | Chunks:
        """`fetch`, except that an instance that went on in a file as it arrived (alone or
        with its series) comes in chunks from that file (DIMSE gives no size ahead: the
        arrival tells)."""
        data = await self._retrieve(item)
        return await open_spooled(data) if isinstance(data, Spooled) else data

    async def _retrieve(self, item: Item) -> bytes | Spooled:
        study_uid, series_uid, sop_uid = split_key(item.source_key)
        data = await self._from_series(study_uid, series_uid, sop_uid)
        if data is not None:
            return data
        q = _image_query(item.source_key)
        self.arrivals.expect([sop_uid])
        try:
            async with self.pool.take() as assoc:
                if self.retrieve == "get":
                    final = await self.connector.run(_get, assoc, q)
                else:
                    final = await self.connector.run(_move, assoc, q, self.peer.calling)
        finally:
            arrived = self.arrivals.take([sop_uid])
        try:
            return self._settle(final, arrived.get(sop_uid))
        except TransferError as exc:
            self.arrivals.discard(arrived.get(sop_uid))
            if exc.verdict.kind is Kind.RETRYABLE and sum(_counts(final)) == 0:
                # Nothing was even tried: is the instance still there? (Orthanc fails a
                # retrieval that matches nothing with the status of any failure.)
                matches, verdict = await self._find(q)
                if verdict is None and not matches:
                    raise TransferError(
                        Verdict(Kind.VANISHED, "no longer on the source (C-FIND finds it no more)")
                    ) from None
            raise

    async def _from_series(
        self, study_uid: str, series_uid: str, sop_uid: str
    ) -> bytes | Spooled | None:
        """The instance from a C-GET or C-MOVE of its whole series (one request for the
        series' instances, which the rows leased after it take from the cache), or None:
        then it is retrieved alone. A series is retrieved whole once per run; an instance
        it did not bring (failed, past the budget, stored since) is retrieved alone."""
        data = self.cache.take(series_uid, sop_uid)
        if data is not None:
            return data
        task = self.series_tasks.get(series_uid)
        if task is None and series_uid not in self.series_done:
            self.series_done[series_uid] = None
            while len(self.series_done) > SERIES_REMEMBERED:
                self.series_done.pop(next(iter(self.series_done)))
            task = asyncio.ensure_future(self._get_series(study_uid, series_uid))
            self.series_tasks[series_uid] = task
            task.add_done_callback(lambda _t: self.series_tasks.pop(series_uid, None))
        if task is None:
            return None
        try:
            await asyncio.shield(task)
        except TransferError:
            return None  # the instance alone says what is wrong
        return self.cache.take(series_uid, sop_uid)

    async def _get_series(self, study_uid: str, series_uid: str) -> None:
        q = query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        if self.retrieve == "get":
            async with self.pool.take() as assoc:
                found = await self.connector.run(_get_whole, assoc, q)
        else:
            # Every instance that arrived whole is kept, whatever the final status says
            # of the others: those are then moved alone, each checked by its counts.
            self.arrivals.expect_series(series_uid)
            try:
                async with self.pool.take() as assoc:
                    await self.connector.run(_move, assoc, q, self.peer.calling)
            finally:
                found = self.arrivals.take_series(series_uid)
        self.cache.put(series_uid, found)

    def _settle(self, final: Dataset | None, data: bytes | Spooled | None) -> bytes | Spooled:
        """The received instance once the final status checks out, else TransferError."""
        operation = f"C-{self.retrieve.upper()}"
        status = int(final.Status) if final is not None and "Status" in final else None
        counts = _counts(final)
        completed, failed, warning = counts
        if status is not None and status not in (0xFF00, 0xFF01):
            verdict = verdict_for_dimse_status(status, side="source", operation=operation)
            if verdict is not None and verdict.kind is Kind.FATAL:
                raise TransferError(verdict)
        else:
            verdict = verdict_for_dimse_status(None, side="source", operation=operation)
        if verdict is None and data is not None and failed == 0 and completed + warning == 1:
            return data
        if verdict is None and completed + warning + failed == 0 and data is None:
            raise TransferError(
                Verdict(Kind.VANISHED, f"no longer on the source: {operation} matched nothing")
            )
        if verdict is None:
            verdict = Verdict(
                Kind.RETRYABLE,
                f"source {operation}: {completed} completed, {failed} failed, {warning} "
                f"warning sub-operations; instance {'arrived' if data else 'did not arrive'}",
            )
        raise TransferError(verdict)

    def _open_get(self, extra: bool = False) -> Association:
        contexts = self._get_contexts()
        roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in contexts[1:]]
        unique = list({r.sop_class_uid: r for r in roles}.values())
        return self.connector.associate(
            contexts,
            roles=unique,
            handlers=[(evt.EVT_C_STORE, self.arrivals.on_store)],
            extra=extra,
        )

    def _get_contexts(self) -> list[PresentationContext]:
        """The C-GET context, then storage contexts in the SCP role (see the module)."""
        contexts = [build_context(GET_MODEL)]
        budget = MAX_STORAGE_CONTEXTS
        seen = list(self.sop_classes)[-(budget // (1 + len(COMPRESSED))) :]
        for sop_class in seen:
            contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
            contexts.extend(build_context(sop_class, [ts]) for ts in COMPRESSED)
        taken = set(seen)
        for cx in StoragePresentationContexts:
            if len(contexts) > budget:
                break
            if cx.abstract_syntax not in taken:
                contexts.append(build_context(cx.abstract_syntax, list(UNCOMPRESSED)))
        return contexts[: budget + 1]

    def _open_move(self, extra: bool = False) -> Association:
        return self.connector.associate([build_context(MOVE_MODEL)], extra=extra)

    async def aclose(self) -> None:
        """Release the associations, stop our SCP and the threads."""
        for task in list(self.series_tasks.values()):
            task.cancel()
        await self.pool.aclose()
        await self.finds.aclose()
        if self.scp is not None:
            await self.connector.run(self.scp.stop)
            self.scp = None
        self.connector.close()
        self.cache.clear()
        self.arrivals.close()


def _get(assoc: Association, q: Dataset) -> Dataset | None:
    """A C-GET to its end (blocking): the final response (None: none came)."""
    final = None
    pause_reactor(assoc)
    for status, _ in assoc.send_c_get(q, GET_MODEL):
        if status and "Status" in status:
            final = status
    return final


def _get_whole(assoc: Association, q: Dataset) -> dict[str, bytes | Spooled]:
    """A C-GET whose instances are all kept (by SOP Instance UID), whatever its final
    status: each one kept arrived whole."""
    bucket: dict[str, bytes | Spooled] = {}
    assoc.bucket = bucket  # type: ignore[attr-defined]
    try:
        _get(assoc, q)
    finally:
        assoc.bucket = None  # type: ignore[attr-defined]
    return bucket


def _move(assoc: Association, q: Dataset, destination: str) -> Dataset | None:
    """A C-MOVE to `destination` to its end (blocking): the final response."""
    final = None
    pause_reactor(assoc)
    for status, _ in assoc.send_c_move(q, destination, MOVE_MODEL):
        if status and "Status" in status:
            final = status
    return final


def _counts(final: Dataset | None) -> tuple[int, int, int]:
    """(completed, failed, warning) sub-operations of a final C-GET/C-MOVE response."""
    if final is None:
        return 0, 0, 0
    return tuple(  # type: ignore[return-value]
        int(final.get(name) or 0)
        for name in (
            "NumberOfCompletedSuboperations",
            "NumberOfFailedSuboperations",
            "NumberOfWarningSuboperations",
        )
    )


def _image_query(source_key: str) -> Dataset:
    """The IMAGE-level identifier that retrieves one instance."""
    study_uid, series_uid, sop_uid = split_key(source_key)
    return query(
        "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid
    )


def split_range(low: str, high: str) -> list[list[str]] | None:
    """Two halves of a StudyDate range (``YYYYMMDD``, '' for an open bound), or None when
    it is a single day. An open lower bound stays open in the first half, an open upper
    bound in the second, so that no date is left out."""
    start = _day(low) or FIRST_DAY
    end = _day(high) or date.today() + timedelta(days=1)
    if end <= start:
        return None
    middle = start + (end - start) // 2
    return [
        [low, middle.strftime("%Y%m%d")],
        [(middle + timedelta(days=1)).strftime("%Y%m%d"), high],
    ]


def _day(text_value: str) -> date | None:
    if not text_value:
        return None
    try:
        return date(int(text_value[:4]), int(text_value[4:6]), int(text_value[6:8]))
    except ValueError:
        return None


def _range_text(low: str, high: str) -> str:
    return f"StudyDate {low or '…'} to {high or '…'}" if (low or high) else "every StudyDate"
