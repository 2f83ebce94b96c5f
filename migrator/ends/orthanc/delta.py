"""A source that lists only what the target lacks (`migrator replicate --only-missing`).

The listing is the difference of the two servers' inventories, computed when the listing
starts (and again when an interrupted listing resumes: instances sent meanwhile are no
longer missing, and the ledger ignores rows it holds). Rows are described as a REST
listing's are (size, SOPInstanceUID, series and study UIDs), then sent the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from migrator.config import RetryPolicy
from migrator.ends.base import ListingPage
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.source import RestSource

__all__ = ["DeltaSource"]

log = logging.getLogger("migrator")

CURSOR = json.dumps({"phase": "delta"})


class DeltaSource(RestSource):
    """An Orthanc source whose listing is the IDs `missing` returns (the source's
    instances the target lacks, computed by the caller)."""

    def __init__(
        self,
        client: OrthancClient,
        retry: RetryPolicy,
        page_size: int,
        missing: Callable[[], Awaitable[list[str]]],
        also_close: OrthancClient | None = None,
    ) -> None:
        super().__init__(client, retry, page_size)
        self._missing = missing
        self._also_close = also_close

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        ids = await self._missing()
        log.info("source %s: %d instances missing on the target", self.display, len(ids))
        if not ids:
            yield ListingPage([], CURSOR, done=True)
            return
        for at in range(0, len(ids), self.scan):
            rows = await self.uids.rows_for_ids(ids[at : at + self.scan])
            yield ListingPage(rows, CURSOR, done=at + self.scan >= len(ids))

    async def aclose(self) -> None:
        await super().aclose()
        if self._also_close is not None:
            await self._also_close.aclose()
