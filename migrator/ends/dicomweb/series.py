"""Instances fetched by series: the first fetch of a series retrieves the whole series
in one WADO-RS request, and its other instances wait in a cache for their own fetches.

A WADO-RS retrieve costs a server far more than the bytes it sends (Orthanc's plugin
looks the instance up by its three UIDs: about 5 ms against 1 ms for a REST download),
and the engine leases the rows of a study together, so one request per series instead
of one per instance is most of the source's work saved. Bounded: a series answer is
split as it arrives and holds 64 MiB in memory, its instances past that written to files
of the source's spool folder (`spilled.SeriesParts`; an answer the folder has no room
for is abandoned and its instances retrieved one by one), at most 4 series are read at
once (a fetch finding them busy retrieves its instance alone), and the cache is
`migrator.ends.series.SeriesCache` (256 MiB in memory, 5 minutes); both budgets are
lower under a smaller ``max_memory`` (`series.series_budgets`). A series is read whole at
most once per run; an instance its answer did not bring, or any failure of the series
read, falls back to the instance's own retrieve, which decides the row's outcome; one whose
part announces a large file is then streamed (`parts.PartChunks`). A series the listing
found to hold a single instance is never read whole (`SeriesReads.alone`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from migrator.ends.dicomweb.client import DicomWebClient
from migrator.ends.series import CACHE_BUDGET, SERIES_BUDGET, SeriesCache
from migrator.ends.spool import Spooled, SpoolFolder, open_spooled, take_spooled
from migrator.ends.streams import STREAM_ABOVE, Chunks
from migrator.errors import TransferError

__all__ = ["SeriesReads"]

# Series read whole at once.
READS_AT_ONCE = 4
# Series remembered as read (a series is read whole once per run).
REMEMBERED = 100_000


class SeriesReads:
    """The fetches of one source, by series."""

    def __init__(
        self, web: DicomWebClient, most: int = SERIES_BUDGET, cache: int = CACHE_BUDGET
    ) -> None:
        self.web = web
        # Bytes of one series answer read whole, at most.
        self.most = most
        # Instances of a series answer past `most` go on in files here (`spilled`).
        self.spool = SpoolFolder()
        self.cache: SeriesCache[bytes | Spooled] = SeriesCache(cache, SpoolFolder.discard)
        self._reading: dict[str, asyncio.Future[None]] = {}
        self._read: OrderedDict[str, None] = OrderedDict()
        # Series requests made and instances they brought (for the benchmark).
        self.series_reads = 0
        self.instances_brought = 0

    def alone(self, series: str) -> None:
        """The listing found `series` to hold one instance: it is retrieved by that
        instance's own retrieve, never read whole. Both requests bring the same file, but
        only the instance's streams one larger than `streams.STREAM_ABOVE`: a series
        answer over the budget is abandoned after the server built it (Orthanc's plugin
        spends seconds on a 600 MB file before the first byte), then retrieved again."""
        self._remember(series)

    def _remember(self, series: str) -> None:
        self._read[series] = None
        if len(self._read) > REMEMBERED:
            self._read.popitem(last=False)

    async def fetch(self, study: str, series: str, sop: str) -> bytes:
        """The stored file of one instance: from its series' answer when one is (being)
        read, else by its own retrieve."""
        data = await self._from_series(study, series, sop)
        if isinstance(data, Spooled):
            return await take_spooled(data)
        return data if data is not None else await self.web.retrieve(study, series, sop)

    async def open(self, study: str, series: str, sop: str) -> bytes | Chunks:
        """`fetch`, except that an instance its series' answer brought into a file, or one
        retrieved alone and announced larger than `streams.STREAM_ABOVE`, comes in
        chunks (from the file, or as it arrives)."""
        data = await self._from_series(study, series, sop)
        if isinstance(data, Spooled):
            return await open_spooled(data)
        if data is not None:
            return data
        return await self.web.open_instance(study, series, sop, STREAM_ABOVE)

    def close(self) -> None:
        """Drop what waits in the cache and remove the spool folder."""
        self.cache.clear()
        self.spool.close()

    async def _from_series(self, study: str, series: str, sop: str) -> bytes | Spooled | None:
        """The file from its series' answer, when one is (being) read or can be read
        now; None: to be retrieved alone."""
        data = self.cache.take(series, sop)
        if data is not None:
            return data
        pending = self._reading.get(series)
        if pending is not None:
            await asyncio.shield(pending)
            return self.cache.take(series, sop)
        if series not in self._read and len(self._reading) < READS_AT_ONCE:
            return await self._read_series(study, series, sop)
        return None

    async def _read_series(self, study: str, series: str, sop: str) -> bytes | Spooled | None:
        """Read the series whole: `sop`'s file (None when the answer lacks it, had no
        room or failed), the others kept in the cache."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reading[series] = done
        self._remember(series)
        try:
            found = await self.web.retrieve_series(study, series, self.most, self.spool)
        except TransferError:
            found = None  # the instance's own retrieve tells what is wrong, if anything
        finally:
            del self._reading[series]
            done.set_result(None)
        if not found:
            return None
        self.series_reads += 1
        self.instances_brought += len(found)
        data = found.pop(sop, None)
        if found:
            self.cache.put(series, found)
        return data
