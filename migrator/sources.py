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

    async def aclose(self) -> None:
        """Release resources."""
        ...


class RestSource:
    """An Orthanc reached over REST.

    The listing pages through ``/instances?since=&limit=&expand``. ``since`` is an offset
    (no ORDER BY in Orthanc's SQLite index), so a deletion during the listing shifts later
    instances down: each page overlaps the previous one, and duplicates are ignored by
    the ledger. Instances that arrive while the listing runs are caught afterwards from
    the change log, starting at the position recorded before the first page.
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

    async def preflight(self) -> str:
        info = await self.client.system()
        return f"source {self.display}: Orthanc {info.version} ({info.name})"

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        state: dict[str, Any] = json.loads(cursor) if cursor else {}
        if "changes" not in state:
            last = await with_retries(self.client.last_change, self.retry, "GET /changes?last")
            state = {"phase": "offset", "offset": 0, "changes": last}
            yield ListingPage([], json.dumps(state), changes_seq=state["changes"])
        if state["phase"] == "offset":
            while True:
                start = max(state["offset"] - self.overlap, 0)
                page = await with_retries(
                    lambda s=start: self.client.list_instances(s, self.page_size),
                    self.retry,
                    "GET /instances",
                )
                state["offset"] = start + len(page)
                rows = [_row(item) for item in page]
                if len(page) < self.page_size:
                    state["phase"] = "changes"
                    yield ListingPage(rows, json.dumps(state))
                    break
                yield ListingPage(rows, json.dumps(state))
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

    async def fetch(self, lease: Lease) -> bytes:
        return await self.client.get_file(lease.source_key)

    async def aclose(self) -> None:
        await self.client.aclose()


def _row(item: dict[str, Any]) -> dict[str, Any]:
    tags = item.get("MainDicomTags") or {}
    return {
        "source_key": item["ID"],
        "orthanc_id": item["ID"],
        "sop_uid": tags.get("SOPInstanceUID"),
        "size": item.get("FileSize"),
    }
