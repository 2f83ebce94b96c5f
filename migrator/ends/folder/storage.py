"""The source side of ``migrator import``: an old Orthanc storage area or a folder of DICOM.

Everything here reads, nothing writes to the source. Three ways to list a folder:

* :func:`iter_index` streams the instances an Orthanc SQLite ``index`` knows, in
  ``internalId`` order, resumable from the last id seen;
* :func:`~migrator.ends.folder.walk.iter_tree` walks any tree (resumable from the last relative
  path seen) and classifies each entry (see :mod:`migrator.ends.folder.walk`);
* :func:`iter_orphans` lists storage files the index does not know.

:func:`detect` tells which applies to a path.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from migrator.ends.folder.fileclass import (
    Candidate,
    CorruptFile,
    classify_file,
    read_dicom_bytes,
)
from migrator.ends.folder.walk import (
    FOLDER_ADVICE,
    INDEX_NAME,
    INDEX_SIDECARS,
    SQLITE_MAGIC,
    Entry,
    escape_name,
    is_sqlite,
    iter_folder,
    iter_tree,
    ledger_path,
    real_path,
    walk_entries,
    walk_files,
)
from migrator.errors import FatalError

__all__ = [
    "FOLDER_ADVICE",
    "INDEX_NAME",
    "INDEX_SIDECARS",
    "Candidate",
    "CorruptFile",
    "Entry",
    "FolderInfo",
    "IndexLocked",
    "IndexUnreadable",
    "classify_file",
    "detect",
    "escape_name",
    "has_storage_layout",
    "index_summary",
    "iter_folder",
    "iter_index",
    "iter_orphans",
    "iter_tree",
    "ledger_path",
    "read_dicom_bytes",
    "real_path",
    "walk_entries",
    "walk_files",
]

_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ATTACHED_COLUMNS = {"id", "fileType", "uuid", "compressedSize", "uncompressedSize"}
_ATTACHED_COLUMNS |= {"compressionType", "uncompressedMD5"}
_BATCH = 1000
# Orthanc never lets go of its exclusive lock, so waiting longer would only delay the error.
_LOCK_TIMEOUT = 1.0

ATTACHMENT_NAMES = {1: "dicom", 2: "dicom-as-json", 3: "dicom-until-pixel-data"}


class IndexUnreadable(FatalError):
    """The Orthanc index exists but cannot be read."""


class IndexLocked(IndexUnreadable):
    """Another process (normally a running Orthanc) holds the index's lock."""


@dataclass(frozen=True)
class FolderInfo:
    """What :func:`detect` found at a path.

    ``kind`` is one of "orthanc-index", "orthanc-storage-no-index", "dicom-tree", "empty",
    "missing". ``storage`` is the folder holding the files; ``index`` the SQLite file.
    """

    kind: str
    path: str
    storage: str | None = None
    index: str | None = None


# --- detection ----------------------------------------------------------------------------


def detect(path: str) -> FolderInfo:
    """Tell what ``path`` is: an Orthanc index (``path`` or ``path/index``), an Orthanc
    storage area without index (``xx/yy/uuid`` layout), another tree of files, an empty
    folder, or nothing at all. Raises ``PermissionError`` if the folder cannot be listed.
    """
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        return FolderInfo("missing", path)
    if os.path.isfile(path):
        if is_sqlite(path):
            return FolderInfo("orthanc-index", path, os.path.dirname(path), path)
        raise NotADirectoryError(f"{path} is a file, not a folder nor an Orthanc index")
    index = os.path.join(path, INDEX_NAME)
    if is_sqlite(index):
        return FolderInfo("orthanc-index", path, path, index)
    if _has_storage_layout(path):
        return FolderInfo("orthanc-storage-no-index", path, path)
    if next(walk_entries(path), None) is None:
        return FolderInfo("empty", path)
    return FolderInfo("dicom-tree", path, path)


def has_storage_layout(root: str) -> bool:
    """Tell whether ``root`` holds files in Orthanc's ``xx/yy/uuid`` layout (probing the
    first few folders); False also when it cannot be listed."""
    try:
        return _has_storage_layout(root)
    except OSError:
        return False


def _has_storage_layout(root: str, probes: int = 4) -> bool:
    # Probing the first few xx/yy folders is enough: Orthanc creates nothing else there.
    tried = 0
    for first in sorted(os.listdir(root)):
        level1 = os.path.join(root, first)
        if not _HEX2.match(first) or not os.path.isdir(level1):
            continue
        for second in sorted(os.listdir(level1))[:probes]:
            level2 = os.path.join(level1, second)
            if not _HEX2.match(second) or not os.path.isdir(level2):
                continue
            for name in sorted(os.listdir(level2))[:probes]:
                if _UUID.match(name) and name[:2] == first and name[2:4] == second:
                    return True
        tried += 1
        if tried >= probes:
            break
    return False


def storage_path(storage: str, uuid: str) -> str:
    """Return where Orthanc keeps the attachment ``uuid`` under ``storage``."""
    return os.path.join(storage, uuid[0:2], uuid[2:4], uuid)


# --- the SQLite index -------------------------------------------------------------------


def _index_file(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, INDEX_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no Orthanc index at {path}")
    return path


def open_index(path: str) -> sqlite3.Connection:
    """Open an Orthanc index (``path`` = the ``index`` file or its folder) read-only.

    A cleanly stopped index is opened as immutable, which works on read-only media and
    creates no ``-wal``/``-shm`` file beside it. When a write-ahead log is present (Orthanc
    running or killed), the log is honoured; :class:`IndexLocked` is raised if a process
    holds the lock, :class:`IndexUnreadable` if the log cannot be replayed read-only.
    """
    index = _index_file(path)
    with open(index, "rb") as fh:
        header = fh.read(100)
    if not header.startswith(SQLITE_MAGIC):
        raise IndexUnreadable(f"{index} is not an SQLite database")
    wal = index + "-wal"
    wal_mode = len(header) > 18 and header[18] == 2
    uri = "file:" + quote(index)
    if wal_mode and not os.path.exists(wal):
        return _connect(uri + "?mode=ro&immutable=1", index)
    try:
        return _connect(uri + "?mode=ro", index)
    except IndexLocked:
        raise
    except sqlite3.Error as exc:
        if os.path.exists(wal) and os.path.getsize(wal) == 0:
            # An empty log holds nothing to replay: the file alone is the whole database.
            return _connect(uri + "?mode=ro&immutable=1", index)
        raise IndexUnreadable(
            f"cannot read the Orthanc index at {index} ({exc}): it has a pending "
            "write-ahead log or journal (index-wal, index-journal), i.e. Orthanc did not "
            "stop cleanly, and it cannot be replayed read-only here; copy 'index' and its "
            "'index-*' files together to a writable folder and read that copy"
        ) from exc


def _connect(uri: str, index: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=_LOCK_TIMEOUT, check_same_thread=False)
    try:
        # The first real read is where SQLite discovers locks and unreadable logs.
        conn.execute("SELECT value FROM GlobalProperties WHERE property = 1").fetchone()
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise IndexLocked(
                f"the Orthanc index at {index} is locked: is Orthanc still running on it? "
                "stop it first"
            ) from exc
        if "no such table" in str(exc):
            raise IndexUnreadable(f"{index} is not an Orthanc index ({exc})") from exc
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise IndexUnreadable(f"{index} is not a readable SQLite database ({exc})") from exc
    return conn


def _schema_version(conn: sqlite3.Connection, index: str) -> int:
    row = conn.execute("SELECT value FROM GlobalProperties WHERE property = 1").fetchone()
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        raise IndexUnreadable(f"{index} has no readable Orthanc schema version") from None
    columns = {r[1] for r in conn.execute("PRAGMA table_info(AttachedFiles)")}
    if not _ATTACHED_COLUMNS.issubset(columns):
        # Schemas before 4 (Orthanc 0.7.3) lack the MD5 columns this reader relies on.
        raise IndexUnreadable(
            f"the Orthanc index at {index} has schema version {version}, which this tool "
            "cannot read (supported: 5 and 6)"
        )
    return version


# The instance's SOPInstanceUID and its parents' series/study UIDs come from
# MainDicomTags through primary-key lookups, so the listing stays one streaming query.
# "+r.resourceType" keeps SQLite on the rowid order instead of ResourceTypeIndex + sort.
_LIST_SQL = """
SELECT r.internalId, r.publicId, a.uuid, a.compressionType, a.uncompressedSize,
       a.uncompressedMD5, sop.value, ser.value, stu.value
FROM Resources AS r
JOIN AttachedFiles AS a ON a.id = r.internalId AND a.fileType = 1
LEFT JOIN MainDicomTags AS sop
       ON sop.id = r.internalId AND sop.tagGroup = 8 AND sop.tagElement = 24
LEFT JOIN Resources AS se ON se.internalId = r.parentId
LEFT JOIN MainDicomTags AS ser
       ON ser.id = se.internalId AND ser.tagGroup = 32 AND ser.tagElement = 14
LEFT JOIN MainDicomTags AS stu
       ON stu.id = se.parentId AND stu.tagGroup = 32 AND stu.tagElement = 13
WHERE +r.resourceType = 4 AND r.internalId > ?
ORDER BY r.internalId
"""
# With a selection of studies: also the study's StudyDate and AccessionNumber, its
# patient's PatientID and the modalities of all its series (ModalitiesInStudy is not
# stored), so that a study is taken or left whole.
_SELECTION_SQL = _LIST_SQL.replace(
    "sop.value, ser.value, stu.value",
    """sop.value, ser.value, stu.value, sda.value, acc.value, pid.value,
       (SELECT group_concat(m.value, '\\') FROM Resources AS s2
        JOIN MainDicomTags AS m ON m.id = s2.internalId AND m.tagGroup = 8
             AND m.tagElement = 96
        WHERE s2.parentId = se.parentId)""",
).replace(
    "WHERE +r.resourceType",
    """LEFT JOIN MainDicomTags AS sda
       ON sda.id = se.parentId AND sda.tagGroup = 8 AND sda.tagElement = 32
LEFT JOIN MainDicomTags AS acc
       ON acc.id = se.parentId AND acc.tagGroup = 8 AND acc.tagElement = 80
LEFT JOIN Resources AS st ON st.internalId = se.parentId
LEFT JOIN MainDicomTags AS pid
       ON pid.id = st.parentId AND pid.tagGroup = 16 AND pid.tagElement = 32
WHERE +r.resourceType""",
)


def iter_index(
    path: str,
    after: int | None = None,
    *,
    storage: str | None = None,
    check_files: bool = True,
    batch: int = _BATCH,
    study_fields: bool = False,
) -> Iterator[tuple[int, Candidate]]:
    """Yield ``(internalId, Candidate)`` for every instance of an Orthanc index.

    ``path`` is the ``index`` file or its folder; ``storage`` the folder holding the
    attachments (default: the index's folder). Rows come in ``internalId`` order, so
    passing the last id seen as ``after`` resumes the listing. ``source_key`` and
    ``orthanc_id`` are the instance's public id; ``size``/``md5`` describe the
    uncompressed DICOM file. With ``check_files``, rows whose file is absent have
    ``missing=True``. With ``study_fields``, candidates also carry their study's date,
    accession, patient and modalities (for a selection of studies).
    Raises :class:`IndexLocked` if Orthanc is running on the index.
    """
    index = _index_file(path)
    storage = os.path.abspath(storage) if storage else os.path.dirname(index)
    prefix = os.path.join(storage, "")
    conn = open_index(index)
    try:
        _schema_version(conn, index)
        sql = _SELECTION_SQL if study_fields else _LIST_SQL
        cur = conn.execute(sql, (after if after is not None else -1,))
        while rows := cur.fetchmany(batch):
            for row in rows:
                yield row[0], _index_candidate(row, prefix, check_files)
    finally:
        conn.close()


def _index_candidate(row: tuple, prefix: str, check_files: bool) -> Candidate:
    _, public_id, uuid, ctype, usize, md5, sop, series, study = row[:9]
    # Same result as storage_path(), without os.path.join's cost on millions of rows.
    path = f"{prefix}{uuid[0:2]}{os.sep}{uuid[2:4]}{os.sep}{uuid}"
    skip = None if ctype in (1, 2) else f"unsupported compression type {ctype}"
    cand = Candidate(
        source_key=public_id,
        path=path,
        orthanc_id=public_id,
        sop_uid=sop,
        study_uid=study,
        series_uid=series,
        size=usize,
        md5=md5 or None,
        has_pixels=None,
        compressed=ctype == 2,
        skip_reason=skip,
        missing=check_files and not os.path.exists(path),
    )
    if len(row) > 9:
        cand.study_date, cand.accession, cand.patient_id, cand.modalities = row[9:]
    return cand


def index_summary(path: str) -> dict:
    """Summarise an Orthanc index: schema version, instances, sizes and attachments.

    Keys: ``schema_version``, ``instances``, ``dicom_files``, ``dicom_bytes`` (uncompressed
    DICOM), ``dicom_stored_bytes`` (on disk), ``stored_bytes`` (all attachments on disk),
    ``compression`` (any attachment stored compressed) and ``attachments`` (count per
    type name, see ``ATTACHMENT_NAMES``; unknown types as ``type-N``).
    """
    index = _index_file(path)
    conn = open_index(index)
    try:
        version = _schema_version(conn, index)
        (instances,) = conn.execute(
            "SELECT COUNT(*) FROM Resources WHERE resourceType = 4"
        ).fetchone()
        rows = conn.execute(
            "SELECT fileType, compressionType, COUNT(*), TOTAL(compressedSize), "
            "TOTAL(uncompressedSize) FROM AttachedFiles GROUP BY fileType, compressionType"
        ).fetchall()
    finally:
        conn.close()
    attachments: dict[str, int] = {}
    summary = {"dicom_files": 0, "dicom_bytes": 0, "dicom_stored_bytes": 0, "stored_bytes": 0}
    compression = False
    for ftype, ctype, count, stored, plain in rows:
        name = ATTACHMENT_NAMES.get(ftype, f"type-{ftype}")
        attachments[name] = attachments.get(name, 0) + count
        summary["stored_bytes"] += int(stored)
        compression = compression or ctype != 1
        if ftype == 1:
            summary["dicom_files"] += count
            summary["dicom_bytes"] += int(plain)
            summary["dicom_stored_bytes"] += int(stored)
    return {
        "schema_version": version,
        "instances": instances,
        **summary,
        "compression": compression,
        "attachments": attachments,
    }


def iter_orphans(path: str, *, storage: str | None = None, batch: int = 500) -> Iterator[str]:
    """Yield storage files (relative posix paths) whose uuid the index does not know.

    Only files in the ``xx/yy/uuid`` layout are considered. The index's uuids are copied
    once into a temporary on-disk table with a key (AttachedFiles has no index on uuid),
    then the walk is checked against it batch by batch, so memory stays bounded.
    """
    index = _index_file(path)
    storage = os.path.abspath(storage) if storage else os.path.dirname(index)
    conn = open_index(index)
    try:
        conn.execute("PRAGMA temp_store = FILE")
        conn.execute("CREATE TEMP TABLE known(uuid TEXT PRIMARY KEY) WITHOUT ROWID")
        conn.execute("INSERT OR IGNORE INTO temp.known SELECT uuid FROM main.AttachedFiles")
        pending: list[tuple[str, str]] = []
        for rel in walk_files(storage):
            parts = rel.split("/")
            if len(parts) == 3 and _UUID.match(parts[2]):
                pending.append((parts[2], rel))
            if len(pending) >= batch:
                yield from _unknown(conn, pending)
                pending = []
        yield from _unknown(conn, pending)
    finally:
        conn.close()


def _unknown(conn: sqlite3.Connection, pending: list[tuple[str, str]]) -> Iterator[str]:
    if not pending:
        return
    marks = ",".join("?" * len(pending))
    sql = f"SELECT uuid FROM temp.known WHERE uuid IN ({marks})"
    known = {row[0] for row in conn.execute(sql, [uuid for uuid, _ in pending])}
    for uuid, rel in pending:
        if uuid not in known:
            yield rel
