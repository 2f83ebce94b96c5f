"""Reading the index database of a stopped Orthanc: the PostgreSQL and MySQL plugins.

The layout was learnt from databases that Debian's plugins wrote (orthanc-postgresql 4.0,
orthanc-mysql 4.3, Orthanc 1.10): the same tables as Orthanc's SQLite index, but
resource types counted from 0 (instance = 3, not 4), the uncompressed MD5 in
``AttachedFiles.uncompressedHash``, and a ``StorageArea (uuid, content, type)`` table
when the storage plugin keeps the attachments (PostgreSQL: ``content`` is the OID of a
large object; MySQL: a ``LONGBLOB``). Unquoted names fold to lower case in PostgreSQL
and keep their case in MySQL, so one SQL text serves both.

Everything here reads: the session's transactions are read-only (the server refuses any
write), and nothing is created in the database, not even a temporary table.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from migrator.config import Settings
from migrator.errors import FatalError, UsageError

__all__ = [
    "INSTANCE",
    "KNOWN_SCHEMAS",
    "Attachment",
    "Content",
    "DbUrl",
    "IndexDatabase",
    "LargeObjectReader",
    "one_line",
    "parse_db_url",
]

# The plugins' resource type of an instance (patient 0, study 1, series 2).
INSTANCE = 3
# The DICOM attachment; 2 (JSON summary) and 3 (header up to the pixel data) are left out.
DICOM_FILE = 1
# (dialect, schema version, schema revision) read from databases the plugins wrote and
# tested here; any other is refused rather than guessed at.
KNOWN_SCHEMAS = {("postgresql", 6, 1), ("mysql", 6, 6)}
# GlobalProperties: 1 = schema version, 4 = the plugins' revision of it ("patch level").
_VERSION, _REVISION = 1, 4
# PostgreSQL plugins: pg_try_advisory_lock(42) for the index, (43) for the storage area,
# held for as long as Orthanc runs (its "Lock" option, on by default).
_PG_LOCKS = (42, 43)
# MySQL plugin: GET_LOCK('<database>.orthanc_index_lock', 0), held while Orthanc runs.
_MYSQL_LOCK = "orthanc_index_lock"
_DEFAULT_PORT = {"postgresql": 5432, "mysql": 3306}
_DEFAULT_USER = {"postgresql": "postgres", "mysql": "root"}
_CONNECT_TIMEOUT = 10
# Large objects are read this many bytes at a time (lo_get with offset), so that no
# single message has to hold a whole large instance.
_READ_CHUNK = 8 * 1024 * 1024

_LIST_SQL = """
SELECT r.internalId, r.publicId, a.uuid, a.compressionType, a.uncompressedSize,
       a.uncompressedHash, sop.value, ser.value, stu.value, dat.value, se.parentId,
       acc.value, pat.value
FROM Resources r
JOIN AttachedFiles a ON a.id = r.internalId AND a.fileType = 1
LEFT JOIN Resources se ON se.internalId = r.parentId
LEFT JOIN MainDicomTags sop ON sop.id = r.internalId AND sop.tagGroup = 8 AND sop.tagElement = 24
LEFT JOIN MainDicomTags ser ON ser.id = se.internalId AND ser.tagGroup = 32
     AND ser.tagElement = 14
LEFT JOIN MainDicomTags stu ON stu.id = se.parentId AND stu.tagGroup = 32
     AND stu.tagElement = 13
LEFT JOIN MainDicomTags dat ON dat.id = se.parentId AND dat.tagGroup = 8 AND dat.tagElement = 32
LEFT JOIN MainDicomTags acc ON acc.id = se.parentId AND acc.tagGroup = 8 AND acc.tagElement = 80
LEFT JOIN MainDicomTags pat ON pat.id = se.parentId AND pat.tagGroup = 16
     AND pat.tagElement = 32
WHERE r.resourceType = 3 AND r.internalId > %s
ORDER BY r.internalId
LIMIT %s
"""

# The DICOM attachment of one instance, found by its public ID (Resources.PublicIndex).
_ATTACHMENT_SQL = """
SELECT a.uuid, a.compressionType, a.compressedSize
FROM Resources r JOIN AttachedFiles a ON a.id = r.internalId AND a.fileType = 1
WHERE r.publicId = %s AND r.resourceType = 3
"""


@dataclass(frozen=True)
class DbUrl:
    """Where an Orthanc index database is, credentials kept apart from what is shown."""

    dialect: str  # "postgresql" or "mysql"
    host: str
    port: int
    user: str
    database: str
    password: str | None = None

    @property
    def display(self) -> str:
        """The URL without password (what logs, ledger and reports show)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.dialect}://{self.user}@{host}:{self.port}/{self.database}"


def parse_db_url(url: str, settings: Settings | None = None) -> DbUrl:
    """Parse ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`` (or ``postgres://``,
    ``mysql://``). A user or password missing from the URL comes from the settings
    (``[source] username/password``, ``MIGRATOR_SOURCE_PASSWORD``)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"bad database URL: {exc}") from None
    scheme = parts.scheme.lower()
    dialect = "postgresql" if scheme in ("postgresql", "postgres") else scheme
    if dialect not in _DEFAULT_PORT:
        raise UsageError(f"not a database URL: {scheme}://")
    database = unquote(parts.path.lstrip("/"))
    shown = f"{dialect}://{parts.hostname or ''}/"
    if not database or "/" in database:
        raise UsageError(f"{shown}: name the database: {dialect}://USER@HOST:PORT/DATABASE")
    if not parts.hostname:
        raise UsageError(f"{dialect}:///{database}: the URL names no host")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if settings is not None:
        user = user or settings.source_username
        if password is None:
            password = settings.source_password
    return DbUrl(
        dialect,
        parts.hostname,
        port or _DEFAULT_PORT[dialect],
        user or _DEFAULT_USER[dialect],
        database,
        password,
    )


@dataclass(frozen=True)
class Attachment:
    """One DICOM attachment as the listing reads it."""

    internal_id: int
    public_id: str
    uuid: str
    compression: int
    size: int | None
    md5: str | None
    sop_uid: str | None
    series_uid: str | None
    study_uid: str | None
    study_date: str | None
    # The study's internalId, AccessionNumber and PatientID (the plugins keep the
    # patient's ID among the study's main tags too): what a selection looks at.
    study_id: int | None = None
    accession: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class Content:
    """The stored bytes of one attachment (None: the index lists it, nothing holds it),
    and how they are stored (1: plain, 2: zlib with an 8-byte size)."""

    uuid: str
    compression: int
    data: bytes | None


class IndexDatabase:
    """A read-only view of an Orthanc index database, with a few connections for the
    transfers (each thread takes one at a time)."""

    def __init__(self, url: DbUrl, *, connections: int = 4) -> None:
        self.url = url
        self.dialect = url.dialect
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        self._max = max(1, connections)  # idle connections kept for the next transfers
        self._main = self._connect()

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> Any:
        """A new read-only connection; one line (FatalError) when the server refuses."""
        u = self.url
        common = {
            "host": u.host,
            "port": u.port,
            "user": u.user,
            "password": u.password or "",
            "connect_timeout": _CONNECT_TIMEOUT,
            "autocommit": True,
        }
        try:
            if self.dialect == "postgresql":
                import psycopg

                conn = psycopg.connect(dbname=u.database, application_name="migrator", **common)
                # Every statement's implicit transaction is read-only: the server refuses
                # any write this session would make.
                conn.execute("SET default_transaction_read_only = on")
                return conn
            import pymysql

            conn = pymysql.connect(database=u.database, charset="utf8mb4", **common)
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION READ ONLY")
            return conn
        except Exception as exc:
            raise FatalError(f"cannot open {u.display}: {one_line(exc)}") from None

    def _borrow(self) -> Any:
        # Never waits for a connection: a transfer holds one at most (a streamed large
        # object for its whole upload), and waiting in a worker thread could hold up
        # the very reads that would give one back.
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return self._connect()

    def _give_back(self, conn: Any, broken: bool) -> None:
        if broken or self._pool.qsize() >= self._max:
            _close(conn)
        else:
            self._pool.put(conn)

    def _rows(self, sql: str, args: tuple[Any, ...] = (), conn: Any = None) -> list[tuple]:
        with (conn or self._main).cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def close(self) -> None:
        """Close every connection."""
        _close(self._main)
        while True:
            try:
                _close(self._pool.get_nowait())
            except queue.Empty:
                break

    # -- checks ------------------------------------------------------------------------

    def schema(self) -> tuple[int, int]:
        """The schema version and revision, checked against the tested ones."""
        try:
            props = dict(
                self._rows(
                    "SELECT property, value FROM GlobalProperties WHERE property IN (%s, %s)",
                    (_VERSION, _REVISION),
                )
            )
        except Exception as exc:
            raise FatalError(
                f"{self.url.display} is not an Orthanc index database ({one_line(exc)})"
            ) from None
        try:
            version, revision = int(props[_VERSION]), int(props.get(_REVISION, 0))
        except (KeyError, TypeError, ValueError):
            raise FatalError(f"{self.url.display} has no readable Orthanc schema version") from None
        if (self.dialect, version, revision) not in KNOWN_SCHEMAS:
            known = ", ".join(f"{v} revision {r}" for d, v, r in KNOWN_SCHEMAS if d == self.dialect)
            raise FatalError(
                f"{self.url.display} has Orthanc schema version {version} revision {revision}, "
                f"which this tool has not been tested with (known: {known}); nothing was read"
            )
        return version, revision

    def holder(self) -> str | None:
        """What shows that an Orthanc still uses the database (its plugins' lock), or None."""
        if self.dialect == "postgresql":
            rows = self._rows(
                "SELECT l.objid, a.client_addr, a.backend_start FROM pg_locks l "
                "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 "
                f"AND l.objsubid = 1 AND l.objid IN {_PG_LOCKS} AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            if not rows:
                return None
            client = rows[0][1] or "a local socket"
            return f"the Orthanc plugins' advisory lock is held (by a session from {client})"
        rows = self._rows("SELECT IS_USED_LOCK(CONCAT(DATABASE(), '.', %s))", (_MYSQL_LOCK,))
        if not rows or rows[0][0] is None:
            return None
        return f"the Orthanc plugin's lock is held (by connection {rows[0][0]})"

    def has_storage_area(self) -> bool:
        """Whether the storage plugin's table is there (else the files are on disk)."""
        if self.dialect == "postgresql":
            rows = self._rows("SELECT to_regclass('storagearea') IS NOT NULL")
            return bool(rows[0][0])
        rows = self._rows(
            "SELECT COUNT(*) FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'StorageArea'"
        )
        return bool(rows[0][0])

    def stored_in_area(self, uuids: list[str]) -> int:
        """How many of `uuids` have content in the storage area."""
        if not uuids:
            return 0
        marks = ",".join(["%s"] * len(uuids))
        sql = f"SELECT COUNT(*) FROM StorageArea WHERE uuid IN ({marks})"
        if self.dialect == "postgresql":
            sql += " AND content IN (SELECT oid FROM pg_largeobject_metadata)"
        return int(self._rows(sql, tuple(uuids))[0][0])

    # -- listing -----------------------------------------------------------------------

    def page(self, after: int, limit: int) -> list[Attachment]:
        """The DICOM attachments of the instances after `after`, in internalId order."""
        return [
            Attachment(
                int(r[0]),
                r[1],
                r[2],
                int(r[3]) if r[3] is not None else 1,
                int(r[4]) if r[4] is not None else None,
                r[5] or None,
                r[6],
                r[7],
                r[8],
                r[9],
                int(r[10]) if r[10] is not None else None,
                r[11] or None,
                r[12],
            )
            for r in self._rows(_LIST_SQL, (after, limit))
        ]

    def modalities(self, study_ids: list[int]) -> dict[int, tuple[str, ...]]:
        """The Modality of every series of each study (its ModalitiesInStudy)."""
        if not study_ids:
            return {}
        marks = ",".join(["%s"] * len(study_ids))
        rows = self._rows(
            "SELECT se.parentId, m.value FROM Resources se JOIN MainDicomTags m "
            "ON m.id = se.internalId AND m.tagGroup = 8 AND m.tagElement = 96 "
            f"WHERE se.parentId IN ({marks})",
            tuple(study_ids),
        )
        found: dict[int, set[str]] = {i: set() for i in study_ids}
        for study, modality in rows:
            if modality:
                found[int(study)].add(str(modality).strip())
        return {i: tuple(sorted(m)) for i, m in found.items()}

    def iter_attachments(self, after: int = -1, batch: int = 1000) -> Iterator[Attachment]:
        """Every DICOM attachment after `after`, read a batch at a time."""
        while rows := self.page(after, batch):
            yield from rows
            after = rows[-1].internal_id

    def summary(self) -> dict[str, Any]:
        """Counts and sizes: instances, DICOM attachments (stored and uncompressed bytes,
        compressed ones), attachments per type, and DICOM attachments without content in
        the storage area (when there is one)."""
        (instances,) = self._rows(
            "SELECT COUNT(*) FROM Resources WHERE resourceType = %s", (INSTANCE,)
        )[0]
        rows = self._rows(
            "SELECT fileType, compressionType, COUNT(*), SUM(compressedSize), "
            "SUM(uncompressedSize) FROM AttachedFiles GROUP BY fileType, compressionType"
        )
        out: dict[str, Any] = {
            "instances": int(instances),
            "dicom_files": 0,
            "dicom_bytes": 0,
            "dicom_stored_bytes": 0,
            "compressed_files": 0,
            "attachments": {},
        }
        names = {1: "dicom", 2: "dicom-as-json", 3: "dicom-until-pixel-data"}
        for ftype, ctype, count, stored, plain in rows:
            name = names.get(int(ftype), f"type-{ftype}")
            out["attachments"][name] = out["attachments"].get(name, 0) + int(count)
            if int(ftype) == DICOM_FILE:
                out["dicom_files"] += int(count)
                out["dicom_bytes"] += int(plain or 0)
                out["dicom_stored_bytes"] += int(stored or 0)
                if ctype is not None and int(ctype) != 1:
                    out["compressed_files"] += int(count)
        return out

    def missing_in_area(self, examples: int = 5) -> tuple[int, list[str]]:
        """DICOM attachments the index lists whose content the storage area lacks (no
        row, or, in PostgreSQL, a row whose large object is gone): count, a few IDs."""
        gone = "s.uuid IS NULL"
        same = "s.uuid = a.uuid"
        if self.dialect == "postgresql":
            gone += " OR s.content NOT IN (SELECT oid FROM pg_largeobject_metadata)"
        else:
            # The MySQL plugin made StorageArea utf8mb4_general_ci and AttachedFiles
            # utf8mb4_unicode_ci: compare in StorageArea's, so that its key is used.
            same += " COLLATE utf8mb4_general_ci"
        base = (
            "FROM AttachedFiles a JOIN Resources r ON r.internalId = a.id "
            f"LEFT JOIN StorageArea s ON {same} "
            f"WHERE a.fileType = 1 AND ({gone})"
        )
        (count,) = self._rows(f"SELECT COUNT(*) {base}")[0]
        ids = [r[0] for r in self._rows(f"SELECT r.publicId {base} LIMIT %s", (examples,))]
        return int(count), ids

    # -- content -----------------------------------------------------------------------

    def attachment(self, public_id: str) -> tuple[str, int] | None:
        """The uuid and compression type of an instance's DICOM attachment (None: the
        index no longer lists it)."""
        conn = self._borrow()
        broken = True
        try:
            rows = self._rows(_ATTACHMENT_SQL, (public_id,), conn)
            broken = False
        finally:
            self._give_back(conn, broken)
        if not rows:
            return None
        return rows[0][0], int(rows[0][1]) if rows[0][1] is not None else 1

    def content(self, public_id: str) -> Content | None:
        """The stored bytes of an instance's DICOM attachment from the storage area
        (None: the index no longer lists the instance)."""
        conn = self._borrow()
        broken = True
        try:
            found = self._rows(_ATTACHMENT_SQL, (public_id,), conn)
            if not found:
                broken = False
                return None
            uuid, ctype, stored = found[0]
            ctype = int(ctype) if ctype is not None else 1
            if self.dialect == "postgresql":
                data = self._read_large_object(conn, uuid, stored)
            else:
                rows = self._rows("SELECT content FROM StorageArea WHERE uuid = %s", (uuid,), conn)
                data = bytes(rows[0][0]) if rows else None
            broken = False
            return Content(uuid, ctype, data)
        finally:
            self._give_back(conn, broken)

    def open_large_object(self, public_id: str) -> tuple[LargeObjectReader, int] | None:
        """A reader of an instance's large object and its compression type (PostgreSQL),
        or None when the index or the storage area lacks it (`content` says which)."""
        conn = self._borrow()
        broken = True
        try:
            found = self._rows(_ATTACHMENT_SQL, (public_id,), conn)
            oids = found and self._rows(
                "SELECT s.content FROM StorageArea s JOIN pg_largeobject_metadata m "
                "ON m.oid = s.content WHERE s.uuid = %s",
                (found[0][0],),
                conn,
            )
            broken = False
        finally:
            if broken:
                self._give_back(conn, broken)
        if not oids:
            self._give_back(conn, False)
            return None
        ctype = int(found[0][1]) if found[0][1] is not None else 1
        return LargeObjectReader(self, conn, oids[0][0]), ctype

    def _read_large_object(self, conn: Any, uuid: str, stored: int | None) -> bytes | None:
        rows = self._rows(
            "SELECT s.content FROM StorageArea s JOIN pg_largeobject_metadata m "
            "ON m.oid = s.content WHERE s.uuid = %s",
            (uuid,),
            conn,
        )
        if not rows:
            return None
        oid = rows[0][0]
        if stored is not None and stored <= _READ_CHUNK:
            return bytes(self._rows("SELECT lo_get(%s)", (oid,), conn)[0][0])
        parts: list[bytes] = []
        offset = 0
        while True:
            (chunk,) = self._rows("SELECT lo_get(%s, %s, %s)", (oid, offset, _READ_CHUNK), conn)[0]
            parts.append(bytes(chunk))
            offset += len(chunk)
            if len(chunk) < _READ_CHUNK:
                return b"".join(parts)


class LargeObjectReader:
    """A PostgreSQL large object read like a file (``read(n)``, ``close()``), a piece per
    ``lo_get``, on a connection of the pool held until closed. The driver's errors come
    out as `OSError`, as a file's would (retryable for the transfer)."""

    def __init__(self, db: IndexDatabase, conn: Any, oid: int) -> None:
        self._db = db
        self._conn: Any = conn
        self._oid = oid
        self._offset = 0

    def read(self, size: int) -> bytes:
        """Up to `size` bytes from where the last read ended (b"" at the end)."""
        if self._conn is None:
            raise OSError("large object reader closed")
        try:
            rows = self._db._rows(
                "SELECT lo_get(%s, %s, %s)", (self._oid, self._offset, size), self._conn
            )
        except Exception as exc:
            self._release(broken=True)
            raise OSError(f"large object {self._oid}: {one_line(exc)}") from None
        data = bytes(rows[0][0])
        self._offset += len(data)
        return data

    def close(self) -> None:
        """Give the connection back to the pool."""
        self._release(broken=False)

    def _release(self, broken: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._db._give_back(conn, broken)


def storage_file(storage: str, uuid: str) -> str:
    """Where Orthanc's file storage keeps attachment `uuid` (xx/yy/uuid)."""
    return os.path.join(storage, uuid[0:2], uuid[2:4], uuid)


def one_line(exc: BaseException) -> str:
    """A driver's message on one line (psycopg's run over several; PyMySQL's are tuples)."""
    args = getattr(exc, "args", ())
    pymysql_style = len(args) == 2 and isinstance(args[0], int)  # (code, message)
    text = f"{args[1]} ({args[0]})" if pymysql_style else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _close(conn: Any) -> None:
    # Closing a broken connection may fail too: nothing more to do then.
    with contextlib.suppress(Exception):
        conn.close()
