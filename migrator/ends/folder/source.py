"""The folder source: an old Orthanc storage area (with or without its index) or any tree
of DICOM files, for `migrator import`.

With an index, the listing follows the index (DICOM attachments only, so JSON summaries
and header-only copies are left out by type), then reports the storage files the index
does not know as skipped orphans. Without one, every file is classified from its bytes;
copies of one instance are reduced to one by the ledger: it leases one copy per Orthanc ID
at a time and marks the others skipped. The members of ZIP archives are rows of their own,
read from the archive when sent (:mod:`migrator.ends.folder.archives`); no archive is sent whole.
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

from migrator.ends.base import Item, ListingPage
from migrator.ends.compression import is_zlib_with_size
from migrator.ends.folder.archives import (
    NEVER_WHOLE,
    ArchiveReader,
    MemberGone,
    is_member_path,
    is_zip,
)
from migrator.ends.folder.fileclass import (
    HELD_REASONS,
    Candidate,
    CorruptFile,
    classify_file,
    read_cached,
    read_dicom_bytes,
    stored_bytes,
)
from migrator.ends.folder.storage import (
    FOLDER_ADVICE,
    INDEX_SIDECARS,
    FolderInfo,
    detect,
    escape_name,
    has_storage_layout,
    iter_index,
    iter_orphans,
    iter_tree,
    open_index,
    real_path,
)
from migrator.ends.streams import Chunks, open_file_chunks, streamable
from migrator.errors import FatalError, Kind, TransferError, UsageError, Verdict
from migrator.selection import Selection, StudyFields
from migrator.states import State

# Rows per ledger transaction: large pages keep commits (and fsyncs) few.
PAGE = 5000
TREE_PAGE_SECONDS = 0.25
FIRST_TREE_PAGE_SECONDS = 0.01
# Files up to this size are read on the event loop: a thread hand-off costs more CPU than
# reading a few kilobytes from the page cache.
INLINE_READ = 256 * 1024
# Larger files are read on the event loop too, up to this size, when the page cache holds
# them (`fileclass.read_cached`); otherwise, and when they need inflating, on a thread.
CACHED_READ = 4 * 1024 * 1024
MISSING = "file missing from the storage folder (the index lists it)"
ORPHAN = "orphan: the index does not know this file (retry --state skipped --error orphan)"
PERMISSION_DENIED = "permission denied; run as a user who can read it"
# Files read in a row without permission before a run stops (see fetch).
DENIED_RUN = 20
DENIED = "cannot read this file: permission denied"
# A storage folder that is not the one the index describes (Orthanc's IndexDirectory apart
# from its StorageDirectory, an unmounted share) makes every index row "missing": that must
# stop the import, not end it as a success made of vanished rows. The listing stops before
# saving when the first PROBE_MISSING rows it reads are all missing (or all of them, fewer,
# in a folder without Orthanc's layout), and when MISSING_RUN rows in a row are missing.
PROBE_MISSING = 100
MISSING_RUN = 1000
STORAGE_HINT = "give the folder holding the xx/yy/<uuid> files with --storage DIR"


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
        "study_date": cand.study_date,
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
    # Sending starts with the first page: files without pixel data are held (skipped)
    # until the listing is complete, and the ledger leases one copy per instance at a time.
    send_while_listing = True
    copies_possible = True

    def __init__(
        self, path: str, storage: str | None = None, selection: Selection | None = None
    ) -> None:
        self.path = os.path.abspath(path)
        # Files of other studies are left out of the listing (see `_selected`).
        self.selection = selection or Selection()
        try:
            os.lstat(self.path)
        except PermissionError:
            # A folder on the way cannot be entered (Debian's /var/lib/orthanc is 0750).
            raise UsageError(f"{path}: {PERMISSION_DENIED}") from None
        except (OSError, ValueError):  # ValueError: a NUL byte in the path
            raise UsageError(f"{path}: no such file or folder") from None
        try:
            self.info = detect(self.path)
        except PermissionError:
            raise UsageError(f"{path}: {PERMISSION_DENIED}") from None
        except (NotADirectoryError, OSError) as exc:
            raise UsageError(f"{path}: not a folder to import ({exc})") from None
        if self.info.kind in ("empty", "missing"):
            raise UsageError(f"{path}: {self.info.kind} folder, nothing to import")
        if storage is not None:
            self.info = self._with_storage(path, storage)
        self.display = escape_name(self.info.path)
        self._denied = 0  # files refused in a row by the file system (see fetch)
        self._archives = ArchiveReader()  # members of ZIP archives, for fetch
        # Index rows are keyed by Orthanc ID; bare folders by path relative to the root.
        self.root = self.info.storage or self.info.path
        # An index has one row per instance: no copies to reduce to one.
        self.copies_possible = self.info.index is None

    def _with_storage(self, path: str, storage: str) -> FolderInfo:
        """The index's files live in ``storage`` rather than beside the index."""
        if self.info.kind != "orthanc-index":
            raise UsageError(f"--storage applies to an Orthanc index only; {path} has none")
        folder = os.path.abspath(storage)
        if not os.path.isdir(folder):
            raise UsageError(f"--storage {storage}: no such folder")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise UsageError(f"--storage {storage}: permission denied")
        return FolderInfo(self.info.kind, self.info.path, folder, self.info.index)

    async def preflight(self) -> str:
        if self.info.kind == "orthanc-index":
            # Fails at once, with a clear message, when Orthanc still runs on the index.
            conn = await asyncio.to_thread(open_index, self.info.index)
            conn.close()
            # And before any job is made when its files are not in the storage folder.
            await asyncio.to_thread(self._probe_files)
        return f"source: {describe(self.info)}"

    def _probe_files(self) -> None:
        """Raise :class:`FatalError` when the first index rows have no file (see
        :class:`_MissingFiles`); the listing checks every row again, from its cursor."""
        assert self.info.index is not None
        check = _MissingFiles(self.root)
        with contextlib.closing(iter_index(self.info.index, storage=self.info.storage)) as rows:
            for _, cand in rows:
                check.see(cand)
                if check.found:
                    return
        check.finish()

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
            check = _MissingFiles(self.root)
            listed: list[tuple[int, dict[str, Any]]] = []
            for internal_id, cand in iter_index(
                self.info.index,
                state.get("after"),
                storage=self.info.storage,
                study_fields=not self.selection.empty,
            ):
                if not self._selected(cand):
                    continue
                listed.append((internal_id, _row(cand)))
                check.see(cand)
                # Rows after the last file found wait: if they begin a mass of missing
                # files, the listing stops before saving them, and a rerun with the right
                # --storage lists them again.
                ready = len(listed) - check.run
                if ready >= PAGE:
                    yield _index_page(listed[:ready], state)
                    del listed[:ready]
            check.finish()
            state["phase"] = "orphans"
            yield _index_page(listed, state)
        rows = []
        for rel in iter_orphans(self.info.index, storage=self.info.storage):
            if state.get("orphan") is not None and rel <= state["orphan"]:
                continue
            try:
                cand = classify_file(os.path.join(self.root, rel), self.root)
            except OSError as exc:
                # An orphan is skipped anyway: one that cannot be read says why.
                reason = f"cannot read this file: {exc.strerror or exc}"
                cand = Candidate(rel, os.path.join(self.root, rel), skip_reason=reason)
            if not self._selected(cand):
                continue
            row = _row(cand)
            row["source_key"] = f"orphan:{rel}"
            held = cand.skip_reason in HELD_REASONS  # settled for bare folders only
            row["skip_reason"] = ORPHAN if held else cand.skip_reason or ORPHAN
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
        member = state.get("member")
        for item in iter_tree(self.root, state.get("after"), tuple(member) if member else None):
            row = _row(item.cand)
            if item.failure is not None:
                # A source file that cannot be read is rejected like a corrupt one.
                row["state"] = State.REJECTED.value
            if self._selected(item.cand):
                rows.append(row)
            # The real name (undecodable bytes as surrogates, which JSON escapes): the
            # walk resumes by comparing names as the file system gives them; inside an
            # archive, after the member's position.
            state["after"] = item.rel
            if item.member:
                state["member"] = list(item.member)
            else:
                state.pop("member", None)
            if len(rows) >= PAGE or time.monotonic() - started > seconds:
                yield ListingPage(rows, json.dumps(state))
                rows = []
                started = time.monotonic()
                seconds = min(2 * seconds, TREE_PAGE_SECONDS)
        yield ListingPage(rows, json.dumps(state), done=True)

    def _selected(self, cand: Candidate) -> bool:
        """Whether the selection takes this file's study. With a selection, a file whose
        study is not known (not DICOM, unreadable, without identifiers) is left out: it
        belongs to no selected study. A folder's modalities are the file's own
        (ModalitiesInStudy when it has it, else its Modality; an index's: every series of
        the study)."""
        if self.selection.empty:
            return True
        if not cand.study_uid:
            return False
        modalities = tuple(m for m in (cand.modalities or "").split("\\") if m)
        return self.selection.matches(
            StudyFields(
                study_uid=cand.study_uid,
                study_date=cand.study_date,
                modalities=modalities,
                accession=cand.accession,
                patient_id=cand.patient_id,
            )
        )

    async def fetch(self, item: Item) -> bytes:
        if not item.path:
            raise TransferError(Verdict(Kind.FATAL, f"row {item.source_key} has no file path"))
        if is_member_path(item.path):
            return await self._fetch_member(item.path)
        path = real_path(item.path)
        try:
            if item.size is not None and item.size <= INLINE_READ:
                data = read_dicom_bytes(path)
            else:
                data = await _read_larger(path)
            self._denied = 0
        except FileNotFoundError:
            if await asyncio.to_thread(self._source_gone):
                raise FatalError(
                    f"{self.root} is gone or empty (an unmounted share?): {item.path} cannot "
                    "be read; mount it again and rerun"
                ) from None
            raise TransferError(Verdict(Kind.VANISHED, f"file {item.path} is gone")) from None
        except CorruptFile as exc:
            raise TransferError(Verdict(Kind.PERMANENT, f"corrupt file: {exc}")) from None
        except IsADirectoryError:
            # A folder that could not be listed, retried: the listing is over, so its
            # files are listed by an import of their own.
            raise TransferError(
                Verdict(Kind.PERMANENT, f"{item.path} is a folder: {FOLDER_ADVICE}")
            ) from None
        except PermissionError:
            # One file without read permission is that file's problem (the run goes on,
            # the row is rejected); many in a row mean the wrong user.
            self._denied += 1
            if self._denied >= DENIED_RUN:
                raise FatalError(
                    f"cannot read {item.path} nor the {self._denied - 1} files before it: "
                    f"{PERMISSION_DENIED}, then `migrator retry --state rejected --error "
                    f"'{DENIED}'`"
                ) from None
            raise TransferError(Verdict(Kind.PERMANENT, f"{DENIED} ({item.path})")) from None
        except OSError as exc:
            raise TransferError(
                Verdict(Kind.RETRYABLE, f"cannot read {item.path}: {exc}")
            ) from None
        _refuse_archive(data)
        return data

    async def open(self, item: Item) -> bytes | Chunks:
        """Like `fetch`, but a large file comes as chunks, read (and inflated) on the way
        to the target rather than held whole in memory."""
        if not item.path or is_member_path(item.path) or not streamable(item.size):
            return await self.fetch(item)
        try:
            chunks = await asyncio.to_thread(open_file_chunks, real_path(item.path))
        except OSError:
            chunks = None  # fetch meets the same error and says what it means
        if chunks is None:
            return await self.fetch(item)
        self._denied = 0
        if is_zip(chunks.start):
            await chunks.aclose()
            raise TransferError(Verdict(Kind.PERMANENT, NEVER_WHOLE))
        return chunks

    async def _fetch_member(self, text: str) -> bytes:
        """The bytes of a member of a ZIP archive (read in a thread: opening an archive
        reads its whole central directory)."""
        try:
            data = await asyncio.to_thread(self._archives.read, text)
        except FileNotFoundError:
            raise TransferError(Verdict(Kind.VANISHED, f"archive of {text} is gone")) from None
        except MemberGone as exc:
            raise TransferError(Verdict(Kind.VANISHED, str(exc))) from None
        except CorruptFile as exc:
            raise TransferError(Verdict(Kind.PERMANENT, f"corrupt file: {exc}")) from None
        except PermissionError:
            raise TransferError(Verdict(Kind.PERMANENT, f"{DENIED} ({text})")) from None
        except OSError as exc:
            raise TransferError(Verdict(Kind.RETRYABLE, f"cannot read {text}: {exc}")) from None
        _refuse_archive(data)
        return data

    def _source_gone(self) -> bool:
        """Whether the folder itself went away (an empty mount point, or nothing at all;
        the index may be all that is left), as opposed to one file of it."""
        try:
            with os.scandir(self.root) as it:
                return all(e.name in INDEX_SIDECARS for e in it)
        except OSError:
            return True

    async def aclose(self) -> None:
        self._archives.close()


async def _read_larger(path: str) -> bytes:
    """The bytes to upload of a file larger than `INLINE_READ`: read here when the page
    cache holds it, else on a thread; a file stored compressed is inflated on a thread."""
    raw = read_cached(path, CACHED_READ)
    if raw is None:
        return await asyncio.to_thread(read_dicom_bytes, path)
    if is_zlib_with_size(raw[:10]):
        return await asyncio.to_thread(stored_bytes, raw)
    return raw


def _refuse_archive(data: bytes) -> None:
    """Never hand a ZIP archive to the target: Orthanc would unpack it and store its
    contents outside the ledger (an archive's members are rows of their own)."""
    if is_zip(data):
        raise TransferError(Verdict(Kind.PERMANENT, NEVER_WHOLE))


def _index_page(listed: list[tuple[int, dict[str, Any]]], state: dict[str, Any]) -> ListingPage:
    if listed:
        state["after"] = listed[-1][0]
    return ListingPage([row for _, row in listed], json.dumps(state))


class _MissingFiles:
    """Watches the index rows of one listing for files missing from the storage folder."""

    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.run = 0  # missing files since the last one found
        self.found = False  # a file of this listing was found
        self.first: str | None = None  # the first file of the current run

    def see(self, cand: Candidate) -> None:
        """Count one row; raise :class:`FatalError` when files are missing en masse."""
        if not cand.missing:
            self.run, self.found = 0, True
            return
        self.run += 1
        if self.run == 1:
            self.first = cand.path
        where = f"under {self.storage} (e.g. {self.first})"
        if not self.found and self.run >= PROBE_MISSING:
            raise _missing(f"none of the first {self.run} files the index lists exists {where}")
        if self.run >= MISSING_RUN:
            raise _missing(f"{self.run} files in a row that the index lists are missing {where}")

    def finish(self) -> None:
        """At the end of the index: refuse when no file was found in a folder that has
        no Orthanc files at all (the index's own folder, when the files live elsewhere)."""
        if self.run and not self.found and not has_storage_layout(self.storage):
            raise _missing(
                f"none of the {self.run} files the index lists exists under {self.storage}, "
                f"which holds no Orthanc files (e.g. {self.first})"
            )


def _missing(what: str) -> FatalError:
    # The rows from the first missing one on are not saved: a rerun lists them again.
    return FatalError(f"{what}: is the storage folder elsewhere or not mounted? {STORAGE_HINT}")
