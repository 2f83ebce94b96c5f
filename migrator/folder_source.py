"""The folder source: an old Orthanc storage area (with or without its index) or any tree
of DICOM files, for `migrator import`.

With an index, the listing follows the index (DICOM attachments only, so JSON summaries
and header-only copies are left out by type), then reports the storage files the index
does not know as skipped orphans. Without one, every file is classified from its bytes;
copies of one instance are reduced to one by the ledger: it leases one copy per Orthanc ID
at a time and marks the others skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from migrator.errors import FatalError, Kind, TransferError, UsageError, Verdict
from migrator.fileclass import Candidate, CorruptFile, classify_file, read_dicom_bytes
from migrator.folder import FolderInfo, detect, iter_folder, iter_index, iter_orphans, open_index
from migrator.ledger import Lease
from migrator.sources import ListingPage
from migrator.states import State

# Rows per ledger transaction: large pages keep commits (and fsyncs) few.
PAGE = 5000
TREE_PAGE_SECONDS = 0.25
FIRST_TREE_PAGE_SECONDS = 0.01
# Files up to this size are read on the event loop: a thread hand-off costs more CPU than
# reading a few kilobytes from the page cache.
INLINE_READ = 256 * 1024
MISSING = "file missing from the storage folder (the index lists it)"
ORPHAN = "orphan: the index does not know this file (retry --state skipped --error orphan)"


def _row(cand: Candidate) -> dict[str, Any]:
    row: dict[str, Any] = {
        "source_key": cand.source_key,
        "orthanc_id": cand.orthanc_id,
        "sop_uid": cand.sop_uid,
        "study_uid": cand.study_uid,
        "series_uid": cand.series_uid,
        "path": cand.path,
        "size": cand.size,
        "md5": cand.md5,
        "has_pixels": cand.has_pixels,
        "skip_reason": cand.skip_reason,
    }
    if cand.missing:
        row["state"] = State.VANISHED.value
        row["skip_reason"] = MISSING
    return row


def describe(info: FolderInfo) -> str:
    """One line about what kind of folder is being imported."""
    return {
        "orthanc-index": f"Orthanc storage with its index ({info.index})",
        "orthanc-storage-no-index": f"Orthanc storage folder without index ({info.path})",
        "dicom-tree": f"folder of files ({info.path})",
    }.get(info.kind, info.path)


class FolderSource:
    """Files on disk; rows are keyed by Orthanc ID (index) or relative path (bare folder)."""

    kind = "import"
    # Sending starts with the first page: header-only copies are skipped as they are
    # listed, and the ledger leases one copy per instance at a time.
    send_while_listing = True
    copies_possible = True

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        if not os.path.lexists(self.path):
            raise UsageError(f"{path}: no such file or folder")
        try:
            self.info = detect(self.path)
        except PermissionError:
            raise UsageError(f"{path}: permission denied") from None
        except (NotADirectoryError, OSError) as exc:
            raise UsageError(f"{path}: not a folder to import ({exc})") from None
        if self.info.kind in ("empty", "missing"):
            raise UsageError(f"{path}: {self.info.kind} folder, nothing to import")
        self.display = self.info.path
        # Index rows are keyed by Orthanc ID; bare folders by path relative to the root.
        self.root = self.info.storage or self.info.path
        # An index has one row per instance: no copies to reduce to one.
        self.copies_possible = self.info.index is None

    async def preflight(self) -> str:
        if self.info.kind == "orthanc-index":
            # Fails at once, with a clear message, when Orthanc still runs on the index.
            conn = await asyncio.to_thread(open_index, self.info.index)
            conn.close()
        return f"source: {describe(self.info)}"

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        state: dict[str, Any] = json.loads(cursor) if cursor else {}
        pages = self._index_pages(state) if self.info.index else self._tree_pages(state)
        # Read (and classify) the next pages in a thread while the ledger saves this one.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ListingPage | BaseException | None] = asyncio.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            try:
                for page in pages:
                    if stop.is_set():
                        return
                    asyncio.run_coroutine_threadsafe(queue.put(page), loop).result()
                item: ListingPage | BaseException | None = None
            except BaseException as exc:  # handed to the consumer, raised there
                item = exc
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        producer = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while not queue.empty():
                queue.get_nowait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(producer), 5)

    def _index_pages(self, state: dict[str, Any]) -> Iterator[ListingPage]:
        assert self.info.index is not None
        if state.get("phase", "index") == "index":
            rows: list[dict[str, Any]] = []
            for internal_id, cand in iter_index(
                self.info.index, state.get("after"), storage=self.info.storage
            ):
                rows.append(_row(cand))
                state["after"] = internal_id
                if len(rows) >= PAGE:
                    yield ListingPage(rows, json.dumps(state))
                    rows = []
            state["phase"] = "orphans"
            yield ListingPage(rows, json.dumps(state))
        rows = []
        for rel in iter_orphans(self.info.index, storage=self.info.storage):
            if state.get("orphan") is not None and rel <= state["orphan"]:
                continue
            cand = classify_file(os.path.join(self.root, rel), self.root)
            row = _row(cand)
            row["source_key"] = f"orphan:{rel}"
            row["skip_reason"] = cand.skip_reason or ORPHAN
            rows.append(row)
            state["orphan"] = rel
            if len(rows) >= PAGE:
                yield ListingPage(rows, json.dumps(state))
                rows = []
        yield ListingPage(rows, json.dumps(state), done=True)

    def _tree_pages(self, state: dict[str, Any]) -> Iterator[ListingPage]:
        rows: list[dict[str, Any]] = []
        started = time.monotonic()
        # Classifying files costs time (their headers are parsed): hand rows over after a
        # short while, so that sending starts at once; then in longer pages (fewer commits).
        seconds = FIRST_TREE_PAGE_SECONDS
        for cand in iter_folder(self.root, state.get("after")):
            rows.append(_row(cand))
            state["after"] = cand.source_key
            if len(rows) >= PAGE or time.monotonic() - started > seconds:
                yield ListingPage(rows, json.dumps(state))
                rows = []
                started = time.monotonic()
                seconds = min(2 * seconds, TREE_PAGE_SECONDS)
        yield ListingPage(rows, json.dumps(state), done=True)

    async def fetch(self, lease: Lease) -> bytes:
        if not lease.path:
            raise TransferError(Verdict(Kind.FATAL, f"row {lease.source_key} has no file path"))
        try:
            if lease.size is not None and lease.size <= INLINE_READ:
                return read_dicom_bytes(lease.path)
            return await asyncio.to_thread(read_dicom_bytes, lease.path)
        except FileNotFoundError:
            raise TransferError(Verdict(Kind.VANISHED, f"file {lease.path} is gone")) from None
        except CorruptFile as exc:
            raise TransferError(Verdict(Kind.PERMANENT, f"corrupt file: {exc}")) from None
        except PermissionError:
            raise FatalError(f"cannot read {lease.path}: permission denied") from None
        except OSError as exc:
            raise TransferError(
                Verdict(Kind.RETRYABLE, f"cannot read {lease.path}: {exc}")
            ) from None

    async def aclose(self) -> None:
        return None
