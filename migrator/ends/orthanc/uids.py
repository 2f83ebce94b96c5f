"""Ledger rows of an Orthanc's instances, with their study and series UIDs.

``/instances?expand`` names an instance's series by its Orthanc ID (``ParentSeries``) and
gives its SOPInstanceUID and file size, not the UIDs of its series and study: the
SeriesInstanceUID is on the series, which names its study (``ParentStudy``), which holds
the StudyInstanceUID. They are looked up once per series and per study, not per
instance, and kept: with ``POST /tools/bulk-content`` (many resources per request,
Orthanc 1.9.4+), else ``GET /series/{id}`` and ``GET /studies/{id}``, several at once.

Instances known only by ID (the change log, the reconciliation of a listing) are
described first, the same way (``GET /instances/{id}`` without bulk content). A
resource deleted meanwhile is left out of the answers: its instances keep the columns
that could not be read empty (they are gone, and end `vanished` when sent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from migrator.config import RetryPolicy
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.retrying import with_retries

# Resources per bulk-content request: one answer of a few hundred KiB.
BULK = 1000
# Per-resource requests in flight when the server has no bulk content.
PARALLEL = 8
# Series kept (with their UID and study): far more than the series a listing page holds,
# so a series met again on the next pages is not asked for again; bounded for huge sources.
SERIES_KEPT = 200_000


class UidLookup:
    """Study and series UIDs for the instances of one Orthanc, cached by Orthanc ID."""

    def __init__(self, client: OrthancClient, retry: RetryPolicy) -> None:
        self.client = client
        self.retry = retry
        # During a lookup, series ID -> (SeriesInstanceUID, study ID); study ID ->
        # (StudyInstanceUID, StudyDate); series ID -> (SeriesInstanceUID,
        # StudyInstanceUID, StudyDate), what a row takes.
        self._series: dict[str, tuple[str | None, str | None]] = {}
        self._studies: dict[str, tuple[str | None, str | None]] = {}
        self._uids: dict[str, tuple[str | None, str | None, str | None]] = {}
        # Whether the server answers bulk content (None: not asked yet).
        self.bulk: bool | None = None
        # Pages are fetched several at once: one lookup at a time, so that a series
        # shared by two pages is asked for once.
        self._lock = asyncio.Lock()
        # Requests made, by kind (for tests and benchmarks).
        self.requests: dict[str, int] = {"bulk": 0, "single": 0}

    async def rows(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Ledger rows for expanded instances (answers of ``/instances?expand``)."""
        async with self._lock:  # the rows read the cache this lookup fills
            await self._learn(item.get("ParentSeries") for item in items)
            return self._rows(items)

    async def learn(self, items: list[dict[str, Any]]) -> None:
        """Look up the series and studies of expanded instances not known yet, so that
        `rows` for them asks the server nothing."""
        async with self._lock:
            await self._learn(item.get("ParentSeries") for item in items)

    def _rows(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        uids, unknown, empty = self._uids, (None, None, None), {}
        rows = []
        for item in items:
            key = item["ID"]
            series_uid, study_uid, study_date = uids.get(item.get("ParentSeries"), unknown)
            tags = item.get("MainDicomTags") or empty
            rows.append(
                {
                    "source_key": key,
                    "orthanc_id": key,
                    "sop_uid": tags.get("SOPInstanceUID"),
                    "size": item.get("FileSize"),
                    "series_uid": series_uid,
                    "study_uid": study_uid,
                    "study_date": study_date,
                }
            )
        return rows

    async def rows_for_ids(self, ids: list[str]) -> list[dict[str, Any]]:
        """Ledger rows for instance IDs, each described (size, SOPInstanceUID, series);
        an instance gone meanwhile gives a row with its ID only."""
        found = {item.get("ID"): item for item in await self._describe(ids, "instances")}
        return await self.rows([found.get(i) or {"ID": i} for i in ids])

    async def _learn(self, series_ids: Iterable[str | None]) -> None:
        """Look up the series not known yet, then their studies not known yet (the
        caller holds the lock)."""
        wanted = {s for s in series_ids if s}
        if len(self._uids) + len(wanted) > SERIES_KEPT:
            self._series.clear()
            self._studies.clear()
            self._uids.clear()
        missing = sorted(wanted - self._uids.keys())
        if not missing:
            return
        for item in await self._describe(missing, "series"):
            tags = item.get("MainDicomTags") or {}
            self._series[item["ID"]] = (tags.get("SeriesInstanceUID"), item.get("ParentStudy"))
        studies = {self._series.get(s, (None, None))[1] for s in missing}
        unknown = sorted(s for s in studies - self._studies.keys() if s)
        for item in await self._describe(unknown, "studies"):
            tags = item.get("MainDicomTags") or {}
            self._studies[item["ID"]] = (tags.get("StudyInstanceUID"), tags.get("StudyDate"))
        for series in missing:
            # A series or study deleted meanwhile: its instances are gone too.
            series_uid, study = self._series.pop(series, (None, None))
            study_uid, study_date = (
                self._studies.get(study, (None, None)) if study else (None, None)
            )
            self._uids[series] = (series_uid, study_uid, study_date)

    async def describe(self, ids: list[str], level: str) -> list[dict[str, Any]]:
        """What the server says of each of `ids` at one level (instances, series,
        studies), in bulk where it can; resources it does not hold are left out."""
        return await self._describe(ids, level)

    async def _describe(self, ids: list[str], level: str) -> list[dict[str, Any]]:
        """What the server says of each of `ids` (one level), leaving out unknown ones."""
        if not ids:
            return []
        if self.bulk is not False:
            found: list[dict[str, Any]] = []
            for at in range(0, len(ids), BULK):
                chunk = ids[at : at + BULK]
                self.requests["bulk"] += 1
                answer = await with_retries(
                    lambda c=chunk: self.client.bulk_content(c),
                    self.retry,
                    "POST /tools/bulk-content",
                )
                if answer is None:
                    self.bulk = False
                    break
                self.bulk = True
                found.extend(i for i in answer if isinstance(i.get("ID"), str))
            else:
                return found
        gate = asyncio.Semaphore(PARALLEL)

        async def one(orthanc_id: str) -> dict[str, Any] | None:
            async with gate:
                self.requests["single"] += 1
                return await with_retries(
                    lambda: self.client.resource(level, orthanc_id),
                    self.retry,
                    f"GET /{level}/{{id}}",
                )

        answers = await asyncio.gather(*(one(i) for i in ids))
        return [a for a in answers if a is not None and isinstance(a.get("ID"), str)]
