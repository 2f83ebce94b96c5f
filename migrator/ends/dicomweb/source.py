"""A DICOMweb service as a source: QIDO-RS lists, WADO-RS fetches.

The listing searches studies, then each study's series, then each series' instances,
every level paged with ``limit``/``offset``. Studies are searched within StudyDate
*windows*; the cursor (JSON) keeps the windows still to search and how many studies of
the first one are listed, so that a resumed listing carries on from there.

Many servers cap what one search answers (Orthanc's ``LimitFindResults``, a PACS's
maximum number of matches), often silently: the answer is simply shorter, and paging
further with ``offset`` gives nothing. So a window whose paging ends is tested once:
the window is searched again in two halves (by the median StudyDate of what it
answered); a study that either half names and the whole did not proves a cap, whose
size is then the number of studies the whole answered. From then on any window that
answers that many studies is split (by its median date, or around the one date it
holds) until each answers fewer. A single day holding more studies than the cap cannot
be split further: its hidden studies are named in a note. Studies without StudyDate
are only found by the first (unbounded) search, so a capped server may hide some of
them too. A server that pages in steps smaller than ``limit`` is followed (paging stops
only on an empty page).

Series and instances are checked against the counts their parent reports
(NumberOfStudyRelatedSeries, NumberOfSeriesRelatedInstances): a shortfall is a note.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from migrator.config import RetryPolicy
from migrator.ends.base import Item, ListingPage
from migrator.ends.dicomid import orthanc_instance_id
from migrator.ends.dicomweb.client import DicomWebClient, tag_value, tag_values
from migrator.ends.dicomweb.series import SeriesReads
from migrator.ends.retrying import with_retries
from migrator.ends.series import series_budgets, split_key
from migrator.ends.spool import sweep_spool_folders
from migrator.ends.streams import Chunks
from migrator.selection import Selection, StudyFields

__all__ = ["DicomWebSource"]

log = logging.getLogger("migrator")

# Studies expanded (series and instances searched) at once.
EXPAND_AT_ONCE = 8
# Studies of the page before that each study page starts with: a study deleted meanwhile
# before the offset shifts the rest down, and the overlap absorbs it.
OVERLAP = 2
STUDY_FIELDS = ("00080020", "00080050", "00080061", "00100020", "00201206")

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
STUDY_DATE, ACCESSION, MODALITIES, PATIENT_ID = "00080020", "00080050", "00080061", "00100020"
STUDY_SERIES, SERIES_INSTANCES = "00201206", "00201209"

Window = list[str]  # [first day, last day], "" for an open end


class DicomWebSource:
    """A DICOMweb service root whose instances are listed by QIDO-RS and fetched by
    WADO-RS, byte for byte as stored (``transfer-syntax=*``)."""

    kind = "dicomweb"
    send_while_listing = True
    copies_possible = False

    def __init__(
        self,
        client: DicomWebClient,
        retry: RetryPolicy,
        page_size: int = 1000,
        selection: Selection | None = None,
        memory: int | None = None,
    ) -> None:
        # Not `client`: to the engine that names an Orthanc REST client.
        self.web = client
        # Series read whole and kept for their instances' fetches, within `memory` (the
        # run's budget, `series.series_budgets`).
        self.series = SeriesReads(client, *series_budgets(memory))
        self.display = client.display
        self.retry = retry
        self.page_size = max(page_size, OVERLAP + 1)
        self.selection = selection or Selection()
        # Studies whose series and instances this process listed already (a window
        # searched again after a split names them again).
        self._expanded: set[str] = set()

    async def preflight(self) -> str:
        """Check the root answers QIDO-RS; one line about it."""
        await asyncio.to_thread(sweep_spool_folders)
        await self.web.check()
        return f"source {self.display}: DICOMweb ({self.selection.describe()})"

    # -- listing --------------------------------------------------------------------------

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        """Pages of rows from `cursor` (the JSON state described in the module)."""
        state: dict[str, Any] = json.loads(cursor) if cursor else self._first_state()
        while state["windows"]:
            window = state["windows"][0]
            uids: list[str] = []  # the window's studies, in the order searched
            dates: list[str] = []
            resumed_at = state["offset"]
            offset = resumed_at
            while True:
                start = max(offset - OVERLAP, 0)
                studies = await self._search(
                    "studies", self._study_params(window, start), "QIDO-RS studies"
                )
                if len(studies) <= offset - start:
                    break  # nothing past the overlap: the window is listed
                if uids and not _news(studies[offset - start :], STUDY_UID, set(uids)):
                    # A server ignoring `offset` answers the same page again.
                    notes = [f"QIDO-RS studies: the source ignores offset; {offset} listed"]
                    yield ListingPage([], json.dumps(state), notes=notes)
                    break
                rows: list[dict[str, Any]] = []
                notes: list[str] = []
                fresh = studies[offset - start :]
                for at in range(0, len(fresh), EXPAND_AT_ONCE):
                    group = fresh[at : at + EXPAND_AT_ONCE]
                    for study in group:
                        uid = tag_value(study, STUDY_UID)
                        if uid:
                            uids.append(str(uid))
                            dates.append(str(tag_value(study, STUDY_DATE) or "")[:8])
                    for got_rows, got_notes in await asyncio.gather(
                        *(self._expand(study) for study in group)
                    ):
                        rows += got_rows
                        notes += got_notes
                    if len(rows) >= self.page_size:
                        state["offset"] = offset + at + len(group)
                        yield ListingPage(rows, json.dumps(state), notes=notes)
                        rows, notes = [], []
                offset += len(fresh)
                state["offset"] = offset
                if rows or notes:
                    yield ListingPage(rows, json.dumps(state), notes=notes)
            notes = []
            whole = not resumed_at  # whether `uids` and `dates` cover the whole window
            if not whole and state.get("cap") is None and not state.get("tested"):
                # Resumed mid-window before the test: the test needs all its studies.
                uids, dates = await self._window_studies(window)
                whole = True
            if state.get("cap") is None and not state.get("tested") and uids:
                state["tested"] = True
                if await self._capped(window, set(uids), dates):
                    state["cap"] = len(uids)
                    log.warning(
                        "source %s: searches answer at most %d studies; listing by StudyDate",
                        self.display,
                        len(uids),
                    )
            cap = state.get("cap")
            state["windows"].pop(0)
            if cap is not None and offset >= cap:
                if not whole:
                    # Resumed mid-window: split around the dates of all its studies.
                    uids, dates = await self._window_studies(window)
                parts = _split(window, dates)
                if parts:
                    state["windows"][:0] = parts
                else:
                    notes.append(
                        f"more than {cap} studies dated {window[0]} on the source: its "
                        f"search limit hides the studies past the first {cap}"
                    )
            state["offset"] = 0
            yield ListingPage([], json.dumps(state), done=not state["windows"], notes=notes)

    def _first_state(self) -> dict[str, Any]:
        sel = self.selection
        # Undated studies are left out by any date search: with them wanted, the whole
        # source is searched and `Selection.matches` decides.
        bounded = (sel.since or sel.until) and not sel.include_undated
        window = [sel.since or "", sel.until or ""] if bounded else ["", ""]
        return {"windows": [window], "offset": 0, "cap": None, "tested": False}

    def _study_params(self, window: Window, offset: int) -> list[tuple[str, str]]:
        params = [("limit", str(self.page_size)), ("offset", str(offset))]
        params += [("includefield", tag) for tag in STUDY_FIELDS]
        dates = _date_query(window)
        if dates:
            params.append(("StudyDate", dates))
        if len(self.selection.modalities) == 1:
            params.append(("ModalitiesInStudy", next(iter(self.selection.modalities))))
        return params

    async def _search(
        self, path: str, params: list[tuple[str, str]], what: str
    ) -> list[dict[str, Any]]:
        return await with_retries(
            lambda: self.web.search(path, params),  # type: ignore[arg-type]
            self.retry,
            what,
        )

    async def _paged(self, path: str, key: str, what: str) -> list[dict[str, Any]]:
        """Every match of a search, page by page, until a page comes back empty (or
        names only matches listed already: a server ignoring `offset`)."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            params = [("limit", str(self.page_size)), ("offset", str(len(out)))]
            page = await self._search(path, params, what)
            if not page or (seen and not _news(page, key, seen)):
                return out
            out += page
            seen.update(str(tag_value(item, key)) for item in page)

    async def _expand(self, study: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows of one study (if selected and not listed already) and notes."""
        uid = tag_value(study, STUDY_UID)
        if not uid or uid in self._expanded:
            return [], []
        uid = str(uid)
        fields = StudyFields(
            study_uid=uid,
            study_date=_text(tag_value(study, STUDY_DATE)),
            modalities=tuple(str(m) for m in tag_values(study, MODALITIES)),
            accession=_text(tag_value(study, ACCESSION)),
            patient_id=_text(tag_value(study, PATIENT_ID)),
        )
        if not self.selection.matches(fields):
            self._expanded.add(uid)
            return [], []
        # Orthanc hashes the PatientID it holds, "" when the element is empty or absent:
        # known only when the answer carries the element.
        patient = (fields.patient_id or "") if PATIENT_ID in study else None
        notes: list[str] = []
        series = await self._paged(f"studies/{uid}/series", SERIES_UID, "QIDO-RS series")
        _check_count(study, STUDY_SERIES, len(series), f"study {uid}: series", notes)
        rows: list[dict[str, Any]] = []
        for one in series:
            series_uid = tag_value(one, SERIES_UID)
            if not series_uid:
                continue
            instances = await self._paged(
                f"studies/{uid}/series/{series_uid}/instances", SOP_UID, "QIDO-RS instances"
            )
            where = f"series {series_uid}: instances"
            _check_count(one, SERIES_INSTANCES, len(instances), where, notes)
            if len(instances) == 1:
                self.series.alone(str(series_uid))
            for inst in instances:
                sop = tag_value(inst, SOP_UID)
                if not sop:
                    continue
                row: dict[str, Any] = {
                    "source_key": f"{uid}/{series_uid}/{sop}",
                    "sop_uid": str(sop),
                    "study_uid": uid,
                    "series_uid": str(series_uid),
                    "study_date": fields.study_date,
                }
                if patient is not None:
                    row["orthanc_id"] = orthanc_instance_id(patient, uid, str(series_uid), sop)
                rows.append(row)
        self._expanded.add(uid)
        for note in notes:
            log.warning("source %s: %s", self.display, note)
        return rows, notes

    async def _window_studies(self, window: Window) -> tuple[list[str], list[str]]:
        """The UIDs and dates of every study a window's search answers."""
        uids: list[str] = []
        dates: list[str] = []
        async for study in self._studies(window):
            uids.append(str(tag_value(study, STUDY_UID)))
            dates.append(str(tag_value(study, STUDY_DATE) or "")[:8])
        return uids, dates

    async def _studies(self, window: Window) -> AsyncIterator[dict[str, Any]]:
        offset = 0
        while True:
            page = await self._search(
                "studies", self._study_params(window, offset), "QIDO-RS studies"
            )
            if not page:
                return
            for study in page:
                yield study
            offset += len(page)

    async def _capped(self, window: Window, seen: set[str], dates: list[str]) -> bool:
        """Whether the search of `window` left studies out: one of its halves names a
        study the whole did not."""
        for half in _split(window, dates) or []:
            async for study in self._studies(half):
                if str(tag_value(study, STUDY_UID)) not in seen:
                    return True
        return False

    # -- transfers ------------------------------------------------------------------------

    async def fetch(self, item: Item) -> bytes:
        """The stored file of one listed instance (WADO-RS, by series: `SeriesReads`)."""
        study, series, sop = split_key(item.source_key)
        return await self.series.fetch(study, series, sop)

    async def open(self, item: Item) -> bytes | Chunks:
        """The file, whole (QIDO-RS gives no sizes) unless it was retrieved alone and its
        part announced a large one: then in chunks as it arrives (`parts.PartChunks`)."""
        study, series, sop = split_key(item.source_key)
        return await self.series.open(study, series, sop)

    async def probe(self) -> bool:
        """Whether QIDO-RS answers again."""
        return await self.web.answers()

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self.series.series_reads:
            log.info(
                "source %s: %d series read whole, bringing %d instances",
                self.display,
                self.series.series_reads,
                self.series.instances_brought,
            )
        self.series.close()
        await self.web.aclose()


def _news(page: list[dict[str, Any]], key: str, seen: set[str]) -> bool:
    """Whether a page names anything not in `seen`."""
    return any(str(tag_value(item, key)) not in seen for item in page)


def _text(value: Any) -> str | None:
    return None if value is None else str(value).strip() or None


def _check_count(
    parent: dict[str, Any], tag: str, listed: int, where: str, notes: list[str]
) -> None:
    """A note when the search listed fewer children than the parent says it has."""
    expected = tag_value(parent, tag)
    try:
        expected = int(expected) if expected is not None else None
    except (TypeError, ValueError):
        expected = None
    if expected is not None and listed < expected:
        notes.append(f"{where}: the search answered {listed} of {expected} (a search limit?)")


def _date_query(window: Window) -> str | None:
    """The StudyDate matching value of a window (None: unbounded)."""
    first, last = window
    if not first and not last:
        return None
    if first and first == last:
        return first
    return f"{first}-{last}"


def _day(text: str, shift: int) -> str:
    day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    return (day + datetime.timedelta(days=shift)).strftime("%Y%m%d")


def _split(window: Window, dates: list[str]) -> list[Window] | None:
    """`window` in narrower windows around the dates its search answered (None when it
    cannot be narrowed: a single day, or no usable date)."""
    first, last = window
    days = sorted(d for d in dates if len(d) == 8 and d.isdigit())
    if not days or (first and first == last):
        return None
    middle = days[(len(days) - 1) // 2]
    if days[0] != days[-1] and middle != days[-1]:
        return [[first, middle], [_day(middle, 1), last]]
    # One date (or the median at the top): that day alone, and either side of it.
    out: list[Window] = []
    if not first or first < middle:
        out.append([first, _day(middle, -1)])
    out.append([middle, middle])
    if not last or last > middle:
        out.append([_day(middle, 1), last])
    return out
