"""What the engine needs from an end: the `Source` and `Target` protocols.

Ends deal in plain values. A source lists rows (dicts of ledger columns) with a cursor
and hands over the bytes of one `Item`; a target stores bytes and answers a `Stored`, or
raises `TransferError` carrying the one `Verdict` (`migrator.errors`) that says whether
the failure is retryable, permanent for the instance, or fatal for the run. The engine
turns those answers into states; no end imports the ledger, and the ledger imports no
end.

Kinds of end, by URL (`migrator.ends.factory`):

- ``http(s)://`` an Orthanc REST API (`migrator.ends.orthanc`);
- a folder path: an Orthanc storage folder or any DICOM tree (`migrator.ends.folder`);
- ``dicomweb+http(s)://`` a DICOMweb service root (`migrator.ends.dicomweb`);
- ``dicom://AET@host:port`` a DIMSE peer (`migrator.ends.dimse`);
- ``postgresql://`` / ``mysql://`` a stopped Orthanc's index database
  (`migrator.ends.database`).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from migrator.ends.streams import Body, Chunks
from migrator.states import VerifyResult

__all__ = [
    "Checked",
    "Item",
    "ListingPage",
    "SentRow",
    "Source",
    "Stored",
    "Target",
    "md5_hex",
]


def md5_hex(data: bytes) -> str:
    """MD5 of a byte string, as Orthanc prints it (and as every row records it)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Item(Protocol):
    """One listed instance that a source is asked for (the engine passes the ledger's
    lease, which has these attributes, as it is)."""

    @property
    def source_key(self) -> str:
        """The source's own key: an Orthanc ID, a path, ``study/series/sop`` UIDs."""
        ...

    @property
    def path(self) -> str | None:
        """Where a file lies (folder sources), else None."""
        ...

    @property
    def size(self) -> int | None:
        """The size the listing saw, if any."""
        ...

    @property
    def md5(self) -> str | None:
        """The MD5 the listing knows (an index's), checked against the bytes sent."""
        ...

    @property
    def orthanc_id(self) -> str | None:
        """The Orthanc ID of the instance, from its four identifiers, if known."""
        ...


@dataclass
class ListingPage:
    """Rows to add to the ledger and the cursor to save with them.

    Each row is a dict of ledger columns: ``source_key`` always; ``orthanc_id``,
    ``sop_uid``, ``study_uid``, ``series_uid``, ``path``, ``size``, ``md5``,
    ``has_pixels`` where known; ``state`` and ``last_error`` for rows listed already
    settled (a file skipped on purpose, one unreadable).
    """

    rows: list[dict[str, Any]]
    cursor: str | None
    done: bool = False
    changes_seq: int | None = None
    notes: list[str] = field(default_factory=list)


class Source(Protocol):
    """Where instances come from."""

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

    async def fetch(self, item: Item) -> bytes:
        """The DICOM bytes of one listed instance. Raise TransferError."""
        ...

    async def open(self, item: Item) -> bytes | Chunks:
        """The DICOM bytes of an instance whose size is large or unknown: whole, or as
        chunks to stream when it is large (see `migrator.ends.streams`)."""
        ...

    async def aclose(self) -> None:
        """Release resources."""
        ...


@dataclass(frozen=True)
class Stored:
    """The target's confirmation of one stored instance.

    ``status`` is Orthanc's word for it (``Success``, ``AlreadyStored``) or the nearest
    one for other targets (a DIMSE warning status is ``Success`` with a ``warning``).
    ``orthanc_id`` is the Orthanc ID the target answered, when it tells one.
    """

    status: str
    orthanc_id: str | None
    warning: str | None = None


@dataclass(frozen=True)
class SentRow:
    """One `sent` row as `verify` asks a target about it."""

    id: int
    source_key: str
    orthanc_id: str | None
    md5: str | None
    target_status: str | None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None


# What a target found for one sent row, and a detail for the report.
Checked = tuple[VerifyResult, str | None]


class Target(Protocol):
    """Where instances go."""

    kind: str
    display: str
    # True when `check` compares bytes (MD5); False when it can only say `present`.
    byte_proof: bool

    async def preflight(self) -> str:
        """Check the target is usable and accepts us; a one-line description. Raise
        FatalError (unreachable, refused credentials, not the kind of server the URL
        says)."""
        ...

    async def store(self, data: bytes) -> Stored:
        """Store one instance. Raise TransferError."""
        ...

    async def store_stream(self, body: Body) -> Stored:
        """Store one large instance read from `body` (its length is known) as its chunks
        come, without holding it whole; called for the instances the source streams."""
        ...

    async def probe(self) -> bool:
        """Whether the target answers again (the circuit breaker's probe)."""
        ...

    async def check(self, row: SentRow) -> Checked:
        """Whether the target holds `row`: `match`/`differ` by MD5 where it returns the
        stored bytes, else `present`; `missing`; `error` when it cannot tell."""
        ...

    async def study_count(self, study_uid: str) -> int | None:
        """How many instances of a study the target holds (None: cannot tell)."""
        ...

    async def aclose(self) -> None:
        """Release resources."""
        ...
