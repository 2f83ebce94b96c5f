"""Where instances come from: the protocol every source follows, and the Orthanc REST source.

A source does two things: it lists its instances as pages of ledger rows, each page with a
cursor from which the listing resumes after a crash; and it fetches the bytes of one
leased instance. The scheduler saves each page and its cursor in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from migrator.config import RetryPolicy
from migrator.ends.base import Item, ListingPage
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.offsets import (
    AHEAD,
    MERGE_PAGES,
    MERGE_ROWS,
    MERGE_SECONDS,
    OVERLAP_MAX,
    OffsetPages,
)
from migrator.ends.orthanc.uids import UidLookup
from migrator.ends.retrying import with_retries
from migrator.ends.streams import Chunks
from migrator.errors import FatalError, TransferError
from migrator.selection import Selection, StudyFields

__all__ = ["RestSource"]

log = logging.getLogger("migrator")


class RestSource(OffsetPages):
    """An Orthanc reached over REST.

    The listing has three phases, saved in the cursor:

    1. ``offset``: pages of ``/instances?since=&limit=&expand``. ``since`` is an offset
       (no ORDER BY in Orthanc's index), so a deletion during the listing shifts later
       instances down. Each page starts a little before the end of the previous one and
       must contain one of the *anchors* (IDs listed just before, kept in the cursor):
       an anchor found at position p proves that nothing after it slid below the page.
       A page without any anchor means deletions moved them: the anchors are looked for
       further back (cheap ID-only pages) and the page is read again from there; when
       every anchor was deleted, the listing starts over from offset 0 (the ledger
       ignores rows it already has).
       The next page is requested before the one read is checked, from where it starts
       if that one is full. Pages are checked in order, each against the anchors of the
       page before it: the proof holds whichever of the two was read first, as each is
       one snapshot of the index. A page that fails is read again as above and the page
       requested after it is dropped. The pages are read by a task of their own, which
       does not wait for the ledger; what it read within 0.3 s (the first page
       at once) is saved together, in one transaction.
    2. ``reconcile``: one ``GET /instances`` (every ID, in one transaction of the
       source's index): whatever the offset pages missed, for any reason, is listed
       here. When this process read the offset pages from the first, only the IDs they
       missed are looked up and listed; otherwise every ID goes to the ledger, which
       ignores the ones it holds.
    3. ``changes``: instances that arrived while the listing ran come from the change
       log, read from the position recorded before the first page.

    Rows carry the study and series UIDs and the StudyDate, looked up once per series and
    study (`uids.UidLookup`), so that `verify` can compare counts per study and leases
    take studies by date.

    With a selection (`migrator.selection`), the listing goes by study instead: one
    ``POST /tools/find`` at study level (the date range and modalities asked of the
    server) names the candidate studies, sorted by ID; each is described (accession,
    patient) and, when selected, its instances listed whole. The cursor keeps the last
    study listed, so that a resumed listing asks again and carries on after it (a study
    deleted meanwhile shifts nothing). Then the change log, keeping only instances of
    selected studies.
    """

    kind = "replicate"
    send_while_listing = True
    copies_possible = False

    def __init__(
        self,
        client: OrthancClient,
        retry: RetryPolicy,
        page_size: int = 1000,
        ahead: int = AHEAD,
        selection: Selection | None = None,
    ) -> None:
        self.client = client
        self.selection = selection or Selection()
        self.retry = retry
        # A page reaches past the overlap with the one before it, or the listing stalls.
        self.page_size = max(page_size, 2)
        self.display = client.endpoint.display
        # Deletions before a page that the overlap absorbs (more: a step back); each
        # instance of the overlap is read twice.
        self.overlap = min(max(self.page_size // 10, 1), OVERLAP_MAX)
        self.ahead = max(ahead, 0)
        self.merge = max(self.page_size, min(MERGE_ROWS, MERGE_PAGES * self.page_size))
        self.merge_seconds = MERGE_SECONDS
        # Pages read and not yet taken by the ledger, at most: twice what one takes.
        self.queued = 2 * max(self.merge // self.page_size, 1)
        # IDs per request when looking back for the anchors, and rows per ledger page of
        # the reconciliation: ID-only answers are cheap for Orthanc.
        self.scan = min(max(self.page_size * 10, 1000), 100_000)
        self.uids = UidLookup(client, retry)
        # The IDs the offset pages of this process listed, and whether those pages began
        # at offset 0 here (then the reconciliation needs only the others). Exact IDs, not
        # hashes: a collision would hide an instance from both.
        self._seen: set[str] = set()
        self._seen_all = False
        # The reconciliation's `GET /instances`, once the last offset page is read.
        self._snapshot: asyncio.Task[list[str]] | None = None

    async def preflight(self) -> str:
        info = await self.client.system()
        return f"source {self.display}: Orthanc {info.version} ({info.name})"

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        state: dict[str, Any] = json.loads(cursor) if cursor else {}
        if "changes" not in state:
            last = await with_retries(self.client.last_change, self.retry, "GET /changes?last")
            state = {"phase": "offset", "offset": 0, "anchors": [], "changes": last}
            if not self.selection.empty:
                state = {"phase": "studies", "after": "", "changes": last}
            yield ListingPage([], json.dumps(state), changes_seq=state["changes"])
        if state["phase"] == "studies":
            async for page in self._study_pages(state):
                yield page
            state = {"phase": "changes", "changes": state["changes"]}
        if state["phase"] == "offset":
            async for page in self._offset_pages(state):
                yield page
            state = {"phase": "reconcile", "changes": state["changes"]}
        if state["phase"] == "reconcile":
            async for page in self._reconcile(state["changes"]):
                yield page
            state = {"phase": "changes", "changes": state["changes"]}
        while True:
            body = await with_retries(
                lambda s=state["changes"]: self.client.changes(s, 1000), self.retry, "GET /changes"
            )
            ids = [
                c["ID"]
                for c in body.get("Changes", [])
                if c.get("ChangeType") == "NewInstance" and isinstance(c.get("ID"), str)
            ]
            rows = await self.uids.rows_for_ids(list(dict.fromkeys(ids)))
            if not self.selection.empty:
                rows = await self._selected_rows(rows)
            state["changes"] = int(body.get("Last", state["changes"]))
            done = bool(body.get("Done", True))
            yield ListingPage(rows, json.dumps(state), done=done)
            if done:
                return

    def _study_query(self) -> tuple[dict[str, str], Selection]:
        """What `/tools/find` is asked, and what is left for `Selection.matches` to
        check on each study it names."""
        sel, query = self.selection, {}
        if sel.date_range() and not sel.include_undated:
            # A date range leaves out undated studies: with them wanted, every study is
            # named and the dates are checked here.
            query["StudyDate"] = sel.date_range() or ""
        rest = sel
        if sel.modalities:
            query["ModalitiesInStudy"] = "\\".join(sorted(sel.modalities))
            # Not in a study's own tags: the server's match is the one that counts.
            rest = replace(sel, modalities=frozenset())
        return query, rest

    async def _study_pages(self, state: dict[str, Any]) -> AsyncIterator[ListingPage]:
        """The selected studies after ``state["after"]``, whole, a few per page."""
        query, rest = self._study_query()
        found = await with_retries(
            lambda: self.client.find_study_ids(query), self.retry, "POST /tools/find"
        )
        todo = sorted(i for i in set(found) if i > state["after"])
        log.info("source %s: %d candidate studies (%s)", self.display, len(found), query or "all")
        for at in range(0, len(todo), STUDIES_PER_PAGE):
            chunk = todo[at : at + STUDIES_PER_PAGE]
            fields = _study_fields(await self.uids.describe(chunk, "studies"))
            taken = {i: f for i, f in fields.items() if rest.matches(f)}
            rows = await self._study_rows(taken)
            state["after"] = chunk[-1]
            yield ListingPage(rows, json.dumps(state))

    async def _study_rows(self, studies: dict[str, StudyFields]) -> list[dict[str, Any]]:
        """Ledger rows of every instance of `studies` (Orthanc ID -> fields)."""
        gate = asyncio.Semaphore(STUDIES_AT_ONCE)

        async def one(study_id: str) -> list[dict[str, Any]]:
            async with gate:
                return await with_retries(
                    lambda: self.client.study_instances(study_id),
                    self.retry,
                    "GET /studies/{id}/instances",
                )

        ids = sorted(studies)
        answers = await asyncio.gather(*(one(i) for i in ids))
        rows: list[dict[str, Any]] = []
        for study_id, items in zip(ids, answers, strict=True):
            study = studies[study_id]
            for row in await self.uids.rows(items):
                # The study as selected, whatever the series lookup found.
                row["study_uid"], row["study_date"] = study.study_uid, study.study_date
                rows.append(row)
        return rows

    async def _selected_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows (instances from the change log) whose study the selection takes."""
        if not rows:
            return rows
        keys = [r["source_key"] for r in rows]
        series_of = {
            i["ID"]: i.get("ParentSeries") for i in await self.uids.describe(keys, "instances")
        }
        wanted = sorted({s for s in series_of.values() if isinstance(s, str)})
        study_of = {
            s["ID"]: s.get("ParentStudy") for s in await self.uids.describe(wanted, "series")
        }
        studies = await self.uids.describe(
            sorted({s for s in study_of.values() if isinstance(s, str)}), "studies"
        )
        fields = _study_fields(studies, await self._modalities(studies))
        kept = []
        for row in rows:
            series = series_of.get(row["source_key"])
            study = fields.get(study_of.get(series) or "") if series else None
            # Gone meanwhile (no study): nothing to send, and nothing the selection took.
            if study is not None and self.selection.matches(study):
                row["study_date"] = study.study_date
                kept.append(row)
        return kept

    async def _modalities(self, studies: list[dict[str, Any]]) -> dict[str, set[str]]:
        """The modalities of each study (by ID) from its series, when the selection asks
        for modalities (a study as the server describes it does not list them)."""
        if not self.selection.modalities:
            return {}
        series = sorted({i for s in studies for i in s.get("Series") or () if isinstance(i, str)})
        found: dict[str, set[str]] = {}
        for item in await self.uids.describe(series, "series"):
            modality = (item.get("MainDicomTags") or {}).get("Modality")
            if modality and isinstance(item.get("ParentStudy"), str):
                found.setdefault(item["ParentStudy"], set()).add(str(modality))
        return found

    async def _reconcile(self, changes: int) -> AsyncIterator[ListingPage]:
        """The reconciliation: every ID the source holds now (asked for as the last offset
        page was read, or now), against the offset pages."""
        snapshot, self._snapshot = self._snapshot or self._take_snapshot(), None
        ids = await snapshot
        after = json.dumps({"phase": "changes", "changes": changes})
        # Until the last chunk is saved, a resumed listing takes the snapshot again.
        during = json.dumps({"phase": "reconcile", "changes": changes})
        if self._seen_all:
            ids = [i for i in ids if i not in self._seen]
            if ids:
                log.info("source %s: %d instances missed by the pages", self.display, len(ids))
        self._seen = set()
        for at in range(0, len(ids), self.scan):
            chunk = ids[at : at + self.scan]
            last = at + self.scan >= len(ids)
            if self._seen_all:
                rows = await self.uids.rows_for_ids(chunk)
            else:
                rows = [{"source_key": i, "orthanc_id": i} for i in chunk]
            yield ListingPage(rows, after if last else during)
        if not ids:
            yield ListingPage([], after)

    async def fetch(self, item: Item) -> bytes:
        return await self.client.get_file(item.source_key)

    async def open(self, item: Item) -> bytes | Chunks:
        # The answer's Content-Length decides: rows listed from the change log have no size.
        payload = await self.client.open_file(item.source_key, item.size)
        if not isinstance(payload, bytes):
            # Orthanc keeps the MD5 of every file it stores (unless configured not to):
            # one small request spares hashing the whole file on the way (see Body).
            try:
                payload.md5 = await self.client.attachment_md5(item.source_key)
            except TransferError:
                pass  # then it is computed on the way
            except BaseException:
                await payload.aclose()
                raise
        return payload

    async def probe(self) -> bool:
        """Whether the source answers again (the circuit breaker's probe)."""
        try:
            await self.client.system()
        except FatalError:
            return False
        return True

    async def aclose(self) -> None:
        await self.client.aclose()


# Selected studies described and listed per ledger page, and listed at once.
STUDIES_PER_PAGE = 50
STUDIES_AT_ONCE = 8


def _study_fields(
    studies: list[dict[str, Any]], modalities: dict[str, set[str]] | None = None
) -> dict[str, StudyFields]:
    """The fields a selection looks at, by study ID, from studies as the server describes
    them; their modalities, when given, from their series (see `_modalities`)."""
    found = {}
    for study in studies:
        tags = study.get("MainDicomTags") or {}
        found[study["ID"]] = StudyFields(
            study_uid=tags.get("StudyInstanceUID"),
            study_date=tags.get("StudyDate"),
            modalities=tuple(sorted((modalities or {}).get(study["ID"], ()))),
            accession=tags.get("AccessionNumber"),
            patient_id=(study.get("PatientMainDicomTags") or {}).get("PatientID"),
        )
    return found
