"""Where instances come from: the protocol every source follows, and the Orthanc REST source.

A source does two things: it lists its instances as pages of ledger rows, each page with a
cursor from which the listing resumes after a crash; and it fetches the bytes of one
leased instance. The scheduler saves each page and its cursor in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from migrator.config import RetryPolicy
from migrator.errors import Kind, TransferError
from migrator.ledger import Lease
from migrator.orthanc import OrthancClient
from migrator.streams import Chunks

log = logging.getLogger("migrator")

T = TypeVar("T")


async def with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """Await `call`, retrying retryable TransferErrors with backoff (listing requests)."""
    attempt = 0
    while True:
        try:
            return await call()
        except TransferError as exc:
            attempt += 1
            if exc.verdict.kind is not Kind.RETRYABLE or attempt >= policy.max_attempts:
                raise
            ceiling = min(policy.backoff_max, policy.backoff_initial * 2 ** (attempt - 1))
            delay = random.uniform(ceiling / 2, ceiling)
            log.warning("%s failed (%s); retrying in %.1f s", what, exc.verdict.reason, delay)
            await asyncio.sleep(delay)


@dataclass
class ListingPage:
    """Rows to add to the ledger and the cursor to save with them."""

    rows: list[dict[str, Any]]
    cursor: str | None
    done: bool = False
    changes_seq: int | None = None
    notes: list[str] = field(default_factory=list)


class Source(Protocol):
    """What the scheduler needs from a source."""

    kind: str
    display: str
    # True when rows can be sent while the listing goes on.
    send_while_listing: bool
    # True when several rows may hold the same instance (files in a folder): then only
    # one copy per Orthanc ID is leased at a time, and the others end `skipped`.
    copies_possible: bool

    async def preflight(self) -> str:
        """Check the source is usable; return a one-line description. Raise FatalError."""
        ...

    def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        """Pages of rows after `cursor` (None: from the start)."""
        ...

    async def fetch(self, lease: Lease) -> bytes:
        """The DICOM bytes of one leased row. Raise TransferError."""
        ...

    async def open(self, lease: Lease) -> bytes | Chunks:
        """The DICOM bytes of a row whose size is large or unknown: whole, or as chunks to
        stream when the instance is large (see `migrator.streams`). Raise TransferError."""
        ...

    async def aclose(self) -> None:
        """Release resources."""
        ...


class RestSource:
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
    2. ``reconcile``: one ``GET /instances`` (every ID, in one transaction of the
       source's index) is added to the ledger, which ignores the ones it holds: whatever
       the offset pages missed, for any reason, is listed here.
    3. ``changes``: instances that arrived while the listing ran come from the change
       log, read from the position recorded before the first page.
    """

    kind = "replicate"
    send_while_listing = True
    copies_possible = False

    def __init__(self, client: OrthancClient, retry: RetryPolicy, page_size: int = 1000) -> None:
        self.client = client
        self.retry = retry
        self.page_size = page_size
        self.display = client.endpoint.display
        self.overlap = min(max(page_size // 10, 1), 100)
        # IDs per request when looking back for the anchors, and rows per ledger page of
        # the reconciliation: ID-only answers are cheap for Orthanc.
        self.scan = min(max(page_size * 10, 1000), 100_000)

    async def preflight(self) -> str:
        info = await self.client.system()
        return f"source {self.display}: Orthanc {info.version} ({info.name})"

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        state: dict[str, Any] = json.loads(cursor) if cursor else {}
        if "changes" not in state:
            last = await with_retries(self.client.last_change, self.retry, "GET /changes?last")
            state = {"phase": "offset", "offset": 0, "anchors": [], "changes": last}
            yield ListingPage([], json.dumps(state), changes_seq=state["changes"])
        if state["phase"] == "offset":
            while True:
                anchors = state.get("anchors") or []
                page, start = await self._anchored_page(state["offset"], anchors)
                state["offset"] = start + len(page)
                state["anchors"] = _next_anchors(anchors, [item["ID"] for item in page])
                rows = [_row(item) for item in page]
                if len(page) < self.page_size:
                    state = {"phase": "reconcile", "changes": state["changes"]}
                    yield ListingPage(rows, json.dumps(state))
                    break
                yield ListingPage(rows, json.dumps(state))
        if state["phase"] == "reconcile":
            ids = await with_retries(self.client.instance_ids, self.retry, "GET /instances")
            state = {"phase": "changes", "changes": state["changes"]}
            # Until the last chunk is saved, a resumed listing takes the snapshot again.
            during = json.dumps({"phase": "reconcile", "changes": state["changes"]})
            for at in range(0, len(ids), self.scan):
                chunk = ids[at : at + self.scan]
                last = at + self.scan >= len(ids)
                rows = [{"source_key": i, "orthanc_id": i} for i in chunk]
                yield ListingPage(rows, json.dumps(state) if last else during)
            if not ids:
                yield ListingPage([], json.dumps(state))
        while True:
            body = await with_retries(
                lambda s=state["changes"]: self.client.changes(s, 1000), self.retry, "GET /changes"
            )
            rows = [
                {"source_key": c["ID"], "orthanc_id": c["ID"]}
                for c in body.get("Changes", [])
                if c.get("ChangeType") == "NewInstance"
            ]
            state["changes"] = int(body.get("Last", state["changes"]))
            done = bool(body.get("Done", True))
            yield ListingPage(rows, json.dumps(state), done=done)
            if done:
                return

    async def _anchored_page(
        self, offset: int, anchors: list[str]
    ) -> tuple[list[dict[str, Any]], int]:
        """The next expanded page after `offset` and where it starts: a page holding one
        of the anchors (or starting at 0, which misses nothing)."""
        start = max(offset - self.overlap, 0)
        wanted = set(anchors)
        while True:
            page = await with_retries(
                lambda s=start: self.client.list_instances(s, self.page_size),
                self.retry,
                "GET /instances",
            )
            if start == 0 or not wanted or any(item["ID"] in wanted for item in page):
                return page, start
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

    async def fetch(self, lease: Lease) -> bytes:
        return await self.client.get_file(lease.source_key)

    async def open(self, lease: Lease) -> bytes | Chunks:
        # The answer's Content-Length decides: rows listed from the change log have no size.
        return await self.client.open_file(lease.source_key)

    async def aclose(self) -> None:
        await self.client.aclose()


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


def _row(item: dict[str, Any]) -> dict[str, Any]:
    tags = item.get("MainDicomTags") or {}
    return {
        "source_key": item["ID"],
        "orthanc_id": item["ID"],
        "sop_uid": tags.get("SOPInstanceUID"),
        "size": item.get("FileSize"),
    }
