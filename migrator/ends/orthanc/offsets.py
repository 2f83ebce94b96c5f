"""The offset phase of a REST listing: pages of ``/instances?since=&limit=&expand``.

``since`` is an offset (no ORDER BY in Orthanc's index), so a deletion during the listing
shifts later instances down. Each page starts a little before the end of the previous one
and must contain one of the *anchors* (IDs listed just before, kept in the cursor): an
anchor found at position p proves that nothing after it slid below the page. A page
without any anchor means deletions moved them: the anchors are looked for further back
(cheap ID-only pages) and the page is read again from there; when every anchor was
deleted, the listing starts over from offset 0 (the ledger ignores rows it already has).

The pages are read by a task of their own, one request to the server at a time, and
saved by the listing in few, large transactions (see `OffsetPages._read_pages`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from migrator.config import RetryPolicy
from migrator.ends.base import ListingPage
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.uids import BULK, UidLookup
from migrator.ends.retrying import with_retries

__all__ = [
    "AHEAD",
    "LOOKUP_PAGES",
    "MERGE_PAGES",
    "MERGE_ROWS",
    "MERGE_SECONDS",
    "OVERLAP_MAX",
    "OffsetPages",
]

log = logging.getLogger("migrator")

# Offset pages requested before the one read is described (its series and studies looked
# up): none, as Orthanc 1.10 answers one request at a time (see `_read_pages`).
AHEAD = 0
# At most this many rows (or pages) of offset pages go to the ledger in one transaction.
MERGE_ROWS = 10_000
MERGE_PAGES = 10
# The most instances two consecutive offset pages share: more deletions between two
# pages cost a step back to the anchors (an ID-only page, and the page read again),
# each shared instance is read twice on every page (32 made 104 pages of 100,000).
OVERLAP_MAX = 8
# Offset pages whose series and studies are looked up together, at most.
LOOKUP_PAGES = 8
# Seconds of offset pages that go to the ledger together (the first page goes at once).
MERGE_SECONDS = 0.3
# An offset page as read.
Read = list[dict[str, Any]]
# The new rows of offset pages, the cursor after them, and whether they end the phase.
OffsetRows = tuple[list[dict[str, Any]], str, bool]


class OffsetPages:
    """The offset phase, mixed into `RestSource` (which sets these attributes)."""

    client: OrthancClient
    retry: RetryPolicy
    uids: UidLookup
    display: str
    page_size: int
    # Instances two consecutive pages share; pages requested ahead (see `AHEAD`).
    overlap: int
    ahead: int
    # Rows, and seconds of pages, saved together at most; pages read and not yet saved.
    merge: int
    merge_seconds: float
    queued: int
    # IDs per request when looking back for the anchors.
    scan: int
    # The IDs the offset pages of this process listed, whether those began at offset 0
    # here, and the reconciliation's snapshot asked for as the last page was read.
    _seen: set[str]
    _seen_all: bool
    _snapshot: asyncio.Task[list[str]] | None

    async def _offset_pages(self, state: dict[str, Any]) -> AsyncIterator[ListingPage]:
        """The offset phase from `state` (updated page by page); the cursor of its last
        page moves on to the reconciliation.

        The pages are read by a task of their own (`_read_pages`), one after the other
        without waiting for the ledger, into a bounded queue; each ledger page takes
        every page read meanwhile (up to `merge` rows), the first one at once."""
        self._seen_all = state["offset"] == 0
        queue: asyncio.Queue[OffsetRows | BaseException] = asyncio.Queue(self.queued)
        reader = asyncio.create_task(self._read_pages(state, queue))
        loop = asyncio.get_running_loop()
        done = False
        try:
            first = True
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                rows, cursor, last = item
                failure: BaseException | None = None
                # Fewer, larger transactions: what is read within `merge_seconds` goes
                # together (the reading goes on meanwhile). The first rows go at once, so
                # that sending starts.
                until = loop.time() + (0.0 if first else self.merge_seconds)
                first = False
                while not last and len(rows) < self.merge:
                    if queue.empty():
                        wait = until - loop.time()
                        if wait <= 0:
                            break
                        try:
                            item = await asyncio.wait_for(queue.get(), wait)
                        except TimeoutError:
                            break
                    else:
                        item = queue.get_nowait()
                    if isinstance(item, BaseException):
                        failure = item  # raised once the rows read before it are saved
                        break
                    rows.extend(item[0])
                    cursor, last = item[1], item[2]
                yield ListingPage(rows, cursor)
                if failure is not None:
                    raise failure
                if last:
                    done = True
                    return
        finally:
            reader.cancel()  # a listing left early: its pages are read again on resume
            if not done and self._snapshot is not None:
                _forget(self._snapshot)
                self._snapshot = None

    async def _read_pages(
        self, state: dict[str, Any], queue: asyncio.Queue[OffsetRows | BaseException]
    ) -> None:
        """Read the offset pages from `state` into `queue`: each page's new rows, the
        cursor after it, and whether it is the last. A failure is queued after the pages
        read before it.

        Orthanc 1.10 answers one request at a time (its index is locked for each
        resource), and requests in flight together cost it more CPU than they save
        (100 pages of 1,000: 4.6 s of its CPU one by one, 5.6-6.4 s two at a time, in the
        same time). So the server is asked one thing at a time: the next page once the
        answer to a page arrives (its body is then read and parsed while the server works
        on the next one), and the series and studies of several pages (up to
        `LOOKUP_PAGES`, or `uids.BULK` series) together, in one request per level,
        between two pages. With `ahead`, that many more pages are requested at once,
        each from where it starts if the pages before it are full; they are checked in
        order."""
        ahead: deque[tuple[int, asyncio.Task[Read]]] = deque()
        # Pages requested beyond the one read, once it is read.
        depth = max(self.ahead, 1)
        # Pages read and not yet described: their new instances, cursor, and whether last.
        waiting: list[tuple[Read, str, bool]] = []
        series: set[Any] = set()
        first = True
        arrived: dict[int, asyncio.Event] = {}
        hooks = self.client.listing_http.event_hooks["response"]
        hook = _arrival_hook(arrived)
        hooks.append(hook)
        try:
            while True:
                offset, anchors = state["offset"], state.get("anchors") or []
                start = max(offset - self.overlap, 0)
                if ahead and ahead[0][0] != start:
                    _drop(ahead)  # requested from where a full page would have ended
                if not ahead:
                    ahead.append((start, asyncio.create_task(self._read(start))))
                following = start + self.page_size - self.overlap
                if self.ahead:
                    self._request(ahead, following, 1 + self.ahead)
                elif not (first or len(waiting) + 1 >= LOOKUP_PAGES):
                    # The next page is requested once this one's answer arrives, while it
                    # is parsed and checked: Orthanc is done with it then. Not when the
                    # series and studies are looked up after it: they go first.
                    await _arrival(arrived, start, ahead[0][1])
                    self._request(ahead, following, 2)
                arrived.pop(start, None)
                page = await ahead.popleft()[1]
                # Instances listed already: those of the overlap, or anywhere in a page
                # read again from its anchors (the ledger ignores any other listed twice).
                known = self.overlap
                if not _holds_anchor(start, page, set(anchors)):
                    _drop(ahead)
                    page, start = await self._anchored_page(offset, anchors, page)
                    known = len(page)
                ids = [item["ID"] for item in page]
                seen = self._seen
                fresh = [item for item in page[:known] if item["ID"] not in seen]
                fresh.extend(page[known:])
                seen.update(ids)
                state["offset"] = start + len(page)
                state["anchors"] = _next_anchors(anchors, ids)
                last = len(page) < self.page_size
                after = {"phase": "reconcile", "changes": state["changes"]} if last else state
                waiting.append((fresh, json.dumps(after), last))
                series.update(item.get("ParentSeries") for item in fresh)
                # The first page is described at once, so that sending starts.
                if not (first or last or len(waiting) >= LOOKUP_PAGES or len(series) >= BULK):
                    self._request(ahead, state["offset"] - self.overlap, depth)
                    continue
                first = False
                await self.uids.learn([item for fresh, _, _ in waiting for item in fresh])
                if last:
                    # The reconciliation's snapshot, while the last rows are saved.
                    self._snapshot = self._take_snapshot()
                else:
                    self._request(ahead, state["offset"] - self.overlap, depth)
                await asyncio.sleep(0)  # the request goes out before the rows are built
                for fresh, cursor, end in waiting:
                    await queue.put((await self.uids.rows(fresh), cursor, end))
                if last:
                    return
                waiting, series = [], set()
        except Exception as exc:  # the listing raises it
            await queue.put(exc)
        finally:
            hooks.remove(hook)
            _drop(ahead)

    def _take_snapshot(self) -> asyncio.Task[list[str]]:
        """`GET /instances`: every ID, in one answer."""
        return asyncio.create_task(
            with_retries(self.client.instance_ids, self.retry, "GET /instances")
        )

    def _request(self, ahead: deque[tuple[int, asyncio.Task[Read]]], at: int, upto: int) -> None:
        """Request pages from `at` (the start of the page after the one read), and after
        the ones requested already, until `upto` are in flight."""
        while len(ahead) < upto:
            if ahead:
                at = ahead[-1][0] + self.page_size - self.overlap
            ahead.append((at, asyncio.create_task(self._read(at))))

    async def _read(self, start: int) -> Read:
        """One expanded page from `start`."""
        return await with_retries(
            lambda: self.client.list_instances(start, self.page_size),
            self.retry,
            "GET /instances",
        )

    async def _anchored_page(
        self, offset: int, anchors: list[str], page: list[dict[str, Any]] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """The next expanded page after `offset` and where it starts: a page holding one
        of the anchors (or starting at 0, which misses nothing). `page` is the page
        already read from the usual start, if any."""
        start = max(offset - self.overlap, 0)
        wanted = set(anchors)
        while True:
            if page is None:
                page = await self._read(start)
            if _holds_anchor(start, page, wanted):
                return page, start
            page = None
            found = await self._find_anchor(wanted, start + self.overlap)
            if found is None:
                log.warning(
                    "source %s: instances listed last were deleted meanwhile; "
                    "listing again from the start",
                    self.display,
                )
                start = 0
            else:
                # Read again from the anchor: a later deletion is caught the same way.
                start = found

    async def _find_anchor(self, wanted: set[str], below: int) -> int | None:
        """The position of the last anchor before `below`, from ID-only pages read
        backwards (each a little over the previous one); None if none is left."""
        end = below
        while end > 0:
            begin = max(end - self.scan, 0)
            ids = await with_retries(
                lambda b=begin, n=end - begin: self.client.instance_ids(b, n),
                self.retry,
                "GET /instances",
            )
            for index in range(len(ids) - 1, -1, -1):
                if ids[index] in wanted:
                    return begin + index
            end = begin + self.overlap if begin > 0 else 0
        return None


# How many IDs of the pages listed last the cursor keeps as anchors: the end of the last
# page (what the next page overlaps) and a spread over it and the page before, so that
# deleting the last few instances listed does not lose every anchor.
ANCHORS_LAST = 8
ANCHORS_SPREAD = 8
ANCHORS_KEPT = 16


def _next_anchors(previous: list[str], ids: list[str]) -> list[str]:
    """Anchors after a page of `ids`: a few of `previous`, a spread of `ids`, its end."""
    if not ids:
        return previous
    step = max(len(ids) // ANCHORS_SPREAD, 1)
    fresh = ids[::step][:ANCHORS_SPREAD] + ids[-ANCHORS_LAST:]
    return list(dict.fromkeys(previous[-ANCHORS_KEPT:] + fresh))


def _holds_anchor(start: int, page: list[dict[str, Any]], wanted: set[str]) -> bool:
    """Whether a page read from `start` misses nothing after the pages before it."""
    return start == 0 or not wanted or any(item["ID"] in wanted for item in page)


def _arrival_hook(arrived: dict[int, asyncio.Event]) -> Callable[[Any], Awaitable[None]]:
    """An httpx response hook that sets ``arrived[since]`` when the answer to an offset page
    (``GET /instances?since=&limit=&expand``) arrives, before its body is read."""

    async def hook(response: Any) -> None:
        url = response.request.url
        if url.path.endswith("/instances"):
            since = url.params.get("since")
            if since is not None and since.isdigit() and "expand" in url.params:
                arrived.setdefault(int(since), asyncio.Event()).set()

    return hook


async def _arrival(arrived: dict[int, asyncio.Event], since: int, task: asyncio.Task[Read]) -> None:
    """Until the answer to the page from `since` arrives, or its request ends."""
    waiter = asyncio.ensure_future(arrived.setdefault(since, asyncio.Event()).wait())
    try:
        await asyncio.wait((waiter, task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _drop(ahead: deque[tuple[int, asyncio.Task[Read]]]) -> None:
    """Cancel the pages requested ahead (their failures, if any, are not news)."""
    while ahead:
        _forget(ahead.popleft()[1])


def _forget(task: asyncio.Task[Any]) -> None:
    """Cancel a request no longer wanted; its failure, if any, is not news."""
    if task.done() and not task.cancelled():
        task.exception()  # retrieved, so that asyncio does not report it
    task.cancel()
