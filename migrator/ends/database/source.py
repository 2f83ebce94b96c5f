"""`DatabaseSource`: the instances of a stopped Orthanc whose index is in PostgreSQL or MySQL.

The listing pages through the index's DICOM attachments in ``internalId`` order (the
cursor is the last id saved), a batch per query. Each transfer reads one attachment: from
the database's storage area (PostgreSQL large object, MySQL ``LONGBLOB``), or from the old
``StorageDirectory`` given with ``--storage``; a compressed one is inflated, and the
engine checks the bytes against the index's MD5 (a mismatch is `rejected`, never sent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

from migrator.ends.base import Item, ListingPage
from migrator.ends.compression import CorruptFile, decompress_zlib_with_size, is_zlib_with_size
from migrator.ends.database.index import (
    Attachment,
    DbUrl,
    IndexDatabase,
    one_line,
    storage_file,
)
from migrator.ends.folder.fileclass import read_dicom_bytes
from migrator.ends.folder.source import STORAGE_HINT
from migrator.ends.streams import Chunks, FileChunks, open_file_chunks, streamable
from migrator.errors import FatalError, Kind, TransferError, UsageError, Verdict
from migrator.selection import Selection, StudyFields

__all__ = ["HELD_ADVICE", "DatabaseSource"]

log = logging.getLogger(__name__)

PAGE = 2000
# Studies whose modalities are remembered while a selection by modality is listed.
MODALITY_CACHE = 10_000
# The first attachments looked for before the job is made: none found means the content
# is elsewhere (files on disk, another folder), said at once rather than as vanished rows.
PROBE = 20
HELD_ADVICE = (
    "is an Orthanc still running on it? stop it first, or give --force to read it anyway "
    "(instances it receives meanwhile may be missed)"
)
_COMPRESSION = {1: False, 2: True}
# The first bytes of a large object read to tell its layout (as a file's are sniffed).
_HEAD = 132


class DatabaseSource:
    """A stopped Orthanc's index database (and its storage area or storage folder)."""

    kind = "database"
    send_while_listing = True
    copies_possible = False  # one row per instance: the index lists each once

    def __init__(
        self,
        url: DbUrl,
        *,
        storage: str | None = None,
        force: bool = False,
        connections: int = 4,
        selection: Selection | None = None,
    ) -> None:
        self.url = url
        self.selection = selection or Selection()
        # ModalitiesInStudy per study internalId, for the selection (bounded, see _take).
        self._modalities: dict[int, tuple[str, ...]] = {}
        self.display = url.display
        self.force = force
        self.storage = os.path.abspath(storage) if storage else None
        if self.storage is not None and not os.path.isdir(self.storage):
            raise UsageError(f"--storage {storage}: no such folder")
        self.db = IndexDatabase(url, connections=connections)

    async def preflight(self) -> str:
        return await asyncio.to_thread(self._preflight)

    def _preflight(self) -> str:
        version, revision = self.db.schema()
        holder = self.db.holder()
        if holder is not None:
            if not self.force:
                raise FatalError(f"{self.display}: {holder}: {HELD_ADVICE}")
            log.warning("%s: %s; reading it anyway (--force)", self.display, holder)
        if self.storage is None and not self.db.has_storage_area():
            raise UsageError(
                f"{self.display} keeps no attachments (no StorageArea table: Orthanc kept "
                f"its files on disk): {STORAGE_HINT}"
            )
        first = self.db.page(-1, PROBE)
        if first:
            self._probe(first)
        where = self.storage or "the database"
        return (
            f"source: Orthanc index in {self.display} (schema {version} revision {revision}), "
            f"attachments in {where}"
        )

    def _probe(self, first: list[Attachment]) -> None:
        """Refuse when none of the first attachments has content where it is looked for."""
        if self.storage is None:
            if self.db.stored_in_area([a.uuid for a in first]) == 0:
                raise FatalError(
                    f"none of the first {len(first)} attachments the index lists is in the "
                    f"StorageArea of {self.display}: are the files on disk? {STORAGE_HINT}"
                )
            return
        if not any(os.path.exists(storage_file(self.storage, a.uuid)) for a in first):
            example = storage_file(self.storage, first[0].uuid)
            raise FatalError(
                f"none of the first {len(first)} files the index lists exists under "
                f"{self.storage} (e.g. {example}): is the storage folder elsewhere or not "
                f"mounted? {STORAGE_HINT}"
            )

    async def listing(self, cursor: str | None) -> AsyncIterator[ListingPage]:
        state: dict[str, Any] = json.loads(cursor) if cursor else {}
        after = int(state.get("after", -1))
        while True:
            rows = await asyncio.to_thread(self.db.page, after, PAGE)
            if rows:
                after = rows[-1].internal_id
            state["after"] = after
            done = len(rows) < PAGE
            if not self.selection.empty:
                rows = await asyncio.to_thread(self._take, rows)
            yield ListingPage([self._row(a) for a in rows], json.dumps(state), done=done)
            if done:
                return

    def _take(self, rows: list[Attachment]) -> list[Attachment]:
        """The rows of the studies the selection takes (the others are not listed)."""
        if self.selection.modalities:
            studies = {a.study_id for a in rows if a.study_id is not None}
            unknown = sorted(studies - self._modalities.keys())
            if len(self._modalities) + len(unknown) > MODALITY_CACHE:
                self._modalities.clear()  # index order keeps a study's rows together
            self._modalities.update(self.db.modalities(unknown))
        return [
            a
            for a in rows
            if a.study_uid
            and self.selection.matches(
                StudyFields(
                    study_uid=a.study_uid,
                    study_date=a.study_date,
                    modalities=self._modalities.get(a.study_id or -1, ()),
                    accession=a.accession,
                    patient_id=a.patient_id,
                )
            )
        ]

    def _row(self, a: Attachment) -> dict[str, Any]:
        row: dict[str, Any] = {
            "source_key": a.public_id,
            "orthanc_id": a.public_id,
            "sop_uid": a.sop_uid,
            "study_uid": a.study_uid,
            "series_uid": a.series_uid,
            "study_date": a.study_date,
            "path": storage_file(self.storage, a.uuid) if self.storage else None,
            "size": a.size,
            "md5": a.md5,
            "has_pixels": None,
        }
        if a.compression not in _COMPRESSION:
            row["skip_reason"] = f"unsupported compression type {a.compression}"
        return row

    async def fetch(self, item: Item) -> bytes:
        try:
            return await asyncio.to_thread(self._read, item.source_key)
        except TransferError:
            raise
        except Exception as exc:
            # The server went away or a connection broke: the next attempt takes another.
            raise TransferError(
                Verdict(
                    Kind.RETRYABLE,
                    f"cannot read {item.source_key} from {self.display}: {one_line(exc)}",
                )
            ) from None

    def _read(self, public_id: str) -> bytes:
        if self.storage is not None:
            return self._read_file(public_id)
        content = self.db.content(public_id)
        if content is None:
            raise _vanished(f"instance {public_id} is no longer in the index")
        if content.data is None:
            raise _vanished(
                f"attachment {content.uuid} of {public_id} has no content in the StorageArea"
            )
        return _inflate(content.data, content.compression)

    def _read_file(self, public_id: str) -> bytes:
        assert self.storage is not None
        found = self.db.attachment(public_id)
        if found is None:
            raise _vanished(f"instance {public_id} is no longer in the index")
        uuid, ctype = found
        path = storage_file(self.storage, uuid)
        if ctype not in _COMPRESSION:
            raise TransferError(Verdict(Kind.PERMANENT, f"unsupported compression type {ctype}"))
        try:
            return read_dicom_bytes(path, compressed=_COMPRESSION[ctype])
        except FileNotFoundError:
            raise _vanished(f"file {path} is gone") from None
        except CorruptFile as exc:
            raise TransferError(Verdict(Kind.PERMANENT, f"corrupt file: {exc}")) from None
        except PermissionError:
            raise TransferError(Verdict(Kind.PERMANENT, f"permission denied ({path})")) from None

    async def open(self, item: Item) -> bytes | Chunks:
        """A large attachment comes in chunks (inflated on the way): from a file of the
        storage folder, or a PostgreSQL large object read a piece at a time. A MySQL
        ``LONGBLOB`` is one value for the driver: it is read whole."""
        if not streamable(item.size):
            return await self.fetch(item)
        chunks: Chunks | None = None
        try:
            if self.storage is not None and item.path:
                chunks = await asyncio.to_thread(open_file_chunks, item.path)
            elif self.storage is None and self.url.dialect == "postgresql":
                chunks = await asyncio.to_thread(self._open_large_object, item)
        except OSError:
            chunks = None  # fetch meets the same error and says what it means
        return chunks if chunks is not None else await self.fetch(item)

    def _open_large_object(self, item: Item) -> FileChunks | None:
        """Chunks of a large object, or None (then `fetch` says what is missing)."""
        found = self.db.open_large_object(item.source_key)
        if found is None:
            return None
        reader, ctype = found
        try:
            if ctype not in _COMPRESSION:
                reader.close()
                return None
            head = reader.read(_HEAD)
            if not _COMPRESSION[ctype]:
                return FileChunks(reader, item.size or 0, False, head)
            if not is_zlib_with_size(head[:10]):
                reader.close()
                return None  # fetch reads it whole and tells what is wrong with it
            (declared,) = struct.unpack_from("<Q", head)
            return FileChunks(reader, declared, True, head[8:])
        except BaseException:
            reader.close()
            raise

    async def aclose(self) -> None:
        await asyncio.to_thread(self.db.close)


def _inflate(data: bytes, compression: int) -> bytes:
    """The DICOM bytes of stored content (plain, or zlib with an 8-byte size)."""
    if compression == 1:
        return data
    if compression != 2:
        raise TransferError(Verdict(Kind.PERMANENT, f"unsupported compression type {compression}"))
    if not data:
        return b""  # Orthanc stores an empty input as empty content, without size prefix
    try:
        return decompress_zlib_with_size(data)
    except CorruptFile as exc:
        raise TransferError(Verdict(Kind.PERMANENT, f"corrupt attachment: {exc}")) from None


def _vanished(reason: str) -> TransferError:
    return TransferError(Verdict(Kind.VANISHED, reason))
