"""ZIP archives in a folder to import, read as folders of their own.

A file that is not DICOM is an archive when it starts with a ZIP signature (``PK\\x03\\x04``,
or ``PK\\x05\\x06`` for an empty archive), whatever its name, or when its name ends in
``.zip`` (one that cannot then be opened is a damaged archive). A DICOM file is never an
archive: its classification comes first, and a Part-10 file whose free-form preamble
happens to start with ``PK`` still has ``DICM`` at offset 128.

Each member of an archive is a row of its own, keyed ``path/to/archive.zip!member/path``;
an archive inside an archive is opened too (``a.zip!inner.zip!member.dcm``), one level
deep. Members are classified from their first bytes at listing time and read whole only
when their row is sent, straight from the archive (never extracted to disk). A damaged
archive is one row, rejected with the reason; a damaged member is one rejected row.

No archive is ever sent whole: Orthanc unpacks a ZIP posted to ``/instances`` and stores
its contents without the ledger knowing. :func:`is_zip` is the check every read of the
import passes before its bytes go anywhere.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

# Classification from bytes: fileclass has no public entry point for bytes held in memory.
from migrator.ends.folder.fileclass import (
    HELD_REASONS,
    Candidate,
    CorruptFile,
    _classify_bytes,
)
from migrator.ends.folder.walk import escape_name, ledger_path, unescape_name

__all__ = [
    "DAMAGED",
    "EMPTY_ARCHIVE",
    "MAX_MEMBER_SIZE",
    "NEVER_WHOLE",
    "ArchiveReader",
    "Member",
    "MemberGone",
    "is_archive",
    "is_member_path",
    "is_zip",
    "iter_archive",
    "ledger_key",
]

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
DAMAGED = "damaged ZIP archive"
EMPTY_ARCHIVE = "empty ZIP archive"
TOO_DEEP = "ZIP archive inside an archive inside an archive: extract it and import its folder"
NEVER_WHOLE = "a ZIP archive is never sent whole (its members are rows of their own)"
# The ledger path of a member: this marker, then the archive's path and the member names,
# each escaped by ledger_key and joined by "!" (which ledger_key escapes inside names).
MEMBER_PATH = "zip:"
# Archives within archives are opened this deep (1: a.zip!inner.zip!member).
MAX_NESTING = 1
# A member is classified from its first bytes, read in steps up to the most a header can
# sensibly take, so that a zip bomb is never inflated at listing time.
CLASSIFY_READ = 1 << 20
CLASSIFY_MAX = 64 << 20
# A member is sent from memory (its row's size is held from the memory budget like a
# loose file's); a declared size beyond this is no DICOM instance but a zip bomb.
MAX_MEMBER_SIZE = 4 << 30
# An archive inside an archive is opened in memory (never on disk); larger ones are refused.
MAX_NESTED_SIZE = 1 << 30
# Errors reading an archive or a member that mean damage, not a passing fault.
_DAMAGE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,  # a compression method zipfile lacks (deflate64, ...)
    RuntimeError,  # an encrypted member
    ValueError,
    UnicodeDecodeError,
)


class Member(NamedTuple):
    """One row of an archive's listing.

    ``position`` orders the rows of one archive: the member's index among the archive's
    files, then (for an archive inside it) the inner member's index; () for the row of
    the archive itself (damaged or empty). ``failure`` is why it could not be read (the
    row is rejected), or None.
    """

    position: tuple[int, ...]
    cand: Candidate
    failure: str | None


class MemberGone(LookupError):
    """The archive no longer holds the member a row names."""


def is_zip(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like a ZIP archive (and not like a Part-10 DICOM file)."""
    return bytes(data[:4]) in ZIP_SIGNATURES and bytes(data[128:132]) != b"DICM"


def is_archive(path: str) -> bool:
    """Whether the file at ``path`` (already found not to be DICOM) is to be opened as an
    archive: a ZIP signature, or a ``.zip`` name."""
    if path.lower().endswith(".zip"):
        return True
    try:
        with open(path, "rb") as fh:
            return is_zip(fh.read(132))
    except OSError:
        return False


def ledger_key(name: str) -> str:
    """A name as one part of a member's key or path: :func:`escape_name` with ``!`` (the
    separator of archive and member) written ``\\x21``."""
    return escape_name(name, "!")


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """A member's name as the archive stores it: UTF-8 when flagged, otherwise bytes in
    some local code page that zipfile decoded as cp437 (which gives every byte back)."""
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    return info.orig_filename.encode(encoding)


def _name_text(info: zipfile.ZipInfo) -> str:
    """A member's name as text: UTF-8 where its bytes are, the other bytes kept as
    surrogate escapes (like ``os.fsdecode``), so that :func:`ledger_key` keeps them."""
    return _raw_name(info).decode("utf-8", "surrogateescape")


def is_member_path(text: str | None) -> bool:
    """Whether a row's ledger path names a member of an archive."""
    return bool(text) and text.startswith(MEMBER_PATH)  # type: ignore[union-attr]


def _member_path(parts: list[str]) -> str:
    return MEMBER_PATH + "!".join(ledger_key(p) for p in parts)


def _parse_member_path(text: str) -> tuple[str, list[bytes]]:
    archive, *names = text[len(MEMBER_PATH) :].split("!")
    return os.fsdecode(unescape_name(archive)), [unescape_name(n) for n in names]


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return text or type(exc).__name__


def _row(key: str, path: str, reason: str, size: int | None = None) -> Candidate:
    return Candidate(key, path, size=size, skip_reason=reason)


# --- listing -------------------------------------------------------------------------------


def iter_archive(path: str, rel: str, after: tuple[int, ...] | None = None) -> Iterator[Member]:
    """List the archive at ``path`` (``rel`` its walk path, surrogate escapes and all).

    Members come in the archive's own order, each classified from its first bytes; with
    ``after`` (a position yielded before) the listing resumes strictly after it without
    reading what came before. An archive that cannot be opened is one row, keyed like a
    loose file, rejected with the reason; an archive without files is one skipped row.
    """
    own_key, own_path = escape_name(rel), ledger_path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        return  # deleted since the folder was read: no longer part of it
    except OSError as exc:
        reason = f"cannot read this file: {exc.strerror or _why(exc)}"
        yield Member((), _row(own_key, own_path, reason), reason)
        return
    except _DAMAGE as exc:
        reason = f"{DAMAGED}: {_why(exc)}"
        yield Member((), _row(own_key, own_path, reason), reason)
        return
    with archive:
        yield from _members(archive, [path], ledger_key(rel), (), after, own_key, own_path)


def _members(
    archive: zipfile.ZipFile,
    parts: list[str],
    key: str,
    base: tuple[int, ...],
    after: tuple[int, ...] | None,
    own_key: str,
    own_path: str,
) -> Iterator[Member]:
    files = [info for info in archive.infolist() if not info.is_dir()]
    if not files:
        if after is None:
            yield Member(base, _row(own_key, own_path, EMPTY_ARCHIVE), None)
        return
    for index, info in enumerate(files):
        inner_after: tuple[int, ...] | None = None
        if after:
            if index < after[0]:
                continue
            if index == after[0]:
                if len(after) == 1:
                    continue
                inner_after = after[1:]
        name = _name_text(info)
        member_key = f"{key}!{ledger_key(name)}"
        member_parts = [*parts, name]
        position = (*base, index)
        yield from _member(archive, info, member_parts, member_key, position, inner_after)


def is_zip_name(name: str, info: zipfile.ZipInfo) -> bool:
    """Whether a member's name says it is an archive (its bytes may say so too)."""
    return name.lower().endswith(".zip") and info.file_size > 0


def _member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    parts: list[str],
    key: str,
    position: tuple[int, ...],
    inner_after: tuple[int, ...] | None,
) -> Iterator[Member]:
    path = _member_path(parts)
    size = info.file_size
    if size > MAX_MEMBER_SIZE:
        reason = (
            f"ZIP member declares {size} bytes uncompressed ({info.compress_size} stored), more "
            f"than the {MAX_MEMBER_SIZE} bytes a DICOM instance is read into memory with"
        )
        yield Member(position, _row(key, path, reason, size), reason)
        return
    try:
        with archive.open(info) as fh:
            data = fh.read(min(size, CLASSIFY_READ))
            nested = is_zip(data) or is_zip_name(parts[-1], info)
            if nested and len(position) > MAX_NESTING:
                yield Member(position, _row(key, path, TOO_DEEP, size), TOO_DEEP)
                return
            if nested:
                if size > MAX_NESTED_SIZE:
                    reason = (
                        f"ZIP archive inside an archive larger than {MAX_NESTED_SIZE} bytes "
                        "(opened in memory): extract it and import its folder"
                    )
                    yield Member(position, _row(key, path, reason, size), reason)
                    return
                data += fh.read()
                inner = zipfile.ZipFile(io.BytesIO(data))
            else:
                cand = _classify(key, path, data, size, fh)
    except _DAMAGE as exc:
        what = DAMAGED if is_zip_name(parts[-1], info) else "damaged ZIP member"
        reason = f"{what}: {_why(exc)}"
        yield Member(position, _row(key, path, reason, size), reason)
        return
    except OSError as exc:  # a read error of the archive's file: this member's row
        reason = f"cannot read this member: {exc.strerror or _why(exc)}"
        yield Member(position, _row(key, path, reason, size), reason)
        return
    if not nested:
        yield Member(position, cand, None)
        return
    with inner:
        try:
            yield from _members(inner, parts, key, position, inner_after, key, path)
        except _DAMAGE as exc:  # the central directory read, but not what it points at
            reason = f"{DAMAGED}: {_why(exc)}"
            yield Member(position, _row(key, path, reason, size), reason)


def _classify(key: str, path: str, data: bytes, size: int, fh: zipfile.ZipExtFile) -> Candidate:
    """Classify a member from its first bytes, reading more while a longer header may
    change the verdict (identifiers or pixel data beyond what was read)."""
    while True:
        cand = _classify_bytes(key, path, data, False, None)
        partial = len(data) < size
        if not partial:
            return cand
        # A DICOM header cut short: some identifiers found but not all, a reader failing
        # on the cut, or no pixel data yet. What holds no identifier at all in its first
        # megabyte (SOPInstanceUID comes early) is no DICOM, and is not read further: a
        # zip bomb of zeros would cost seconds of parsing per megabyte.
        reason = cand.skip_reason or ""
        undecided = cand.orthanc_id is None and (
            cand.undecided is not None  # no reader could decide it
            or reason.startswith("incomplete DICOM")
        )
        if (undecided or cand.skip_reason in HELD_REASONS) and len(data) < CLASSIFY_MAX:
            data += fh.read(min(size, CLASSIFY_MAX, 4 * len(data)) - len(data))
            continue
        # Only a prefix was read: its length is not the member's, nor is its pixel data
        # short (the target decides when the member is sent whole).
        cand.size = size
        cand.problem = None
        return cand


# --- reading members when their rows are sent ---------------------------------------------


class ArchiveReader:
    """Reads members of archives for the rows being sent, keeping a few archives open.

    Opening an archive reads its whole central directory, so the last few archives (and
    the last archive inside an archive, held in memory) stay open; an archive changed on
    disk since (size or modification time) is opened again. Safe to use from threads.
    """

    OPEN = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[object, tuple[zipfile.ZipFile, dict[bytes, zipfile.ZipInfo]]]
        self._open = OrderedDict()

    def read(self, text: str) -> bytes:
        """The bytes of the member that the ledger path ``text`` names.

        Raises ``FileNotFoundError`` when the archive is gone, :class:`MemberGone` when it
        no longer holds the member, and :class:`~migrator.ends.folder.fileclass.CorruptFile`
        when the
        archive or the member is damaged (or is itself an archive).
        """
        archive_path, names = _parse_member_path(text)
        try:
            st = os.stat(archive_path)
            if len(names) > 1:
                archive, index = self._archive(("inner", archive_path, st.st_mtime_ns, names[0]))
            else:
                archive, index = self._archive(("file", archive_path, st.st_size, st.st_mtime_ns))
            info = _lookup(index, names[-1], text)
            if info.file_size > MAX_MEMBER_SIZE:
                raise CorruptFile(f"ZIP member declares {info.file_size} bytes uncompressed")
            with archive.open(info) as fh:
                data = fh.read()
        except (OSError, MemberGone, CorruptFile):
            raise
        except _DAMAGE as exc:
            raise CorruptFile(f"damaged ZIP member: {_why(exc)}") from None
        if len(data) != info.file_size:
            raise CorruptFile(f"ZIP member holds {len(data)} of {info.file_size} bytes")
        if is_zip(data):
            raise CorruptFile(NEVER_WHOLE)
        return data

    def _archive(self, key: tuple) -> tuple[zipfile.ZipFile, dict[bytes, zipfile.ZipInfo]]:
        with self._lock:
            found = self._open.get(key)
            if found is not None:
                self._open.move_to_end(key)
                return found
            if key[0] == "file":
                archive = zipfile.ZipFile(key[1])
            else:
                outer, index = self._archive_locked(key)
                info = _lookup(index, key[3], f"{key[1]}: {key[3]!r}")
                if info.file_size > MAX_NESTED_SIZE:
                    raise CorruptFile("ZIP archive inside an archive too large to open in memory")
                with outer.open(info) as fh:
                    archive = zipfile.ZipFile(io.BytesIO(fh.read()))
            found = (archive, {_raw_name(i): i for i in archive.infolist() if not i.is_dir()})
            # An older version of this archive is let go of at once.
            older = [k for k in self._open if k[0] == key[0] and k[1] == key[1] and k != key]
            self._open[key] = found
            inner = [k for k in self._open if k[0] == "inner"]
            # One archive inside an archive is kept in memory; a few archive files open.
            files = [k for k in self._open if k[0] == "file"]
            for stale in {*older, *inner[:-1], *files[: -self.OPEN]}:
                # Not closed here: a thread may still be reading from it; the file is
                # closed once the last reader lets go of it.
                del self._open[stale]
            return found

    def _archive_locked(self, key: tuple) -> tuple[zipfile.ZipFile, dict[bytes, zipfile.ZipInfo]]:
        """The outer archive of an inner one's ``key``, with the lock held."""
        st = os.stat(key[1])
        outer_key = ("file", key[1], st.st_size, st.st_mtime_ns)
        found = self._open.get(outer_key)
        if found is None:
            archive = zipfile.ZipFile(key[1])
            found = (archive, {_raw_name(i): i for i in archive.infolist() if not i.is_dir()})
            self._open[outer_key] = found
        return found

    def close(self) -> None:
        """Let go of every archive kept open."""
        with self._lock:
            self._open.clear()


def _lookup(index: dict[bytes, zipfile.ZipInfo], name: bytes, where: str) -> zipfile.ZipInfo:
    info = index.get(name)
    if info is None:
        raise MemberGone(f"{where}: the archive no longer holds this member")
    return info
