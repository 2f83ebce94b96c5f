"""Walking a bare folder for ``migrator import``: every entry, in a resumable order.

:func:`walk_entries` lists a tree (following links to folders kept elsewhere, without
loops) and reports what cannot be read as a file instead of stopping; :func:`iter_tree`
classifies each entry (:func:`~migrator.ends.folder.fileclass.classify_file`) and lists the
members of ZIP archives in their place (:mod:`migrator.ends.folder.archives`). File names
that are not UTF-8 are kept in the ledger as text by :func:`escape_name` and
:func:`ledger_path`, and :func:`real_path` turns a stored path back into the file's.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from typing import NamedTuple

from migrator.ends.folder.fileclass import Candidate, classify_file

__all__ = [
    "FOLDER_ADVICE",
    "INDEX_NAME",
    "INDEX_SIDECARS",
    "Entry",
    "Listed",
    "escape_name",
    "is_sqlite",
    "iter_folder",
    "iter_tree",
    "ledger_path",
    "real_path",
    "unescape_name",
    "walk_entries",
    "walk_files",
]

INDEX_NAME = "index"
INDEX_SIDECARS = ("index", "index-wal", "index-shm", "index-journal")
SQLITE_MAGIC = b"SQLite format 3\x00"


# --- walking a folder -------------------------------------------------------------------

# The listing of a job passes a folder once: files found later belong to another job.
FOLDER_ADVICE = "its files are not in this job; once readable, import that folder on its own"
_FILE, _DIR, _OTHER = 0, 1, 2
# Why an entry of a tree cannot be read as a file; the walk reports it instead of a path.
_SPECIAL = (
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


class Entry(NamedTuple):
    """One entry of a tree as :func:`walk_entries` sees it.

    ``rel`` is the relative posix path as the file system names it (undecodable bytes as
    surrogate escapes, see :func:`escape_name`). ``problem`` is None for a regular file (or
    a symbolic link to one); otherwise it says why the entry cannot be read as a file, and
    ``unreadable`` tells a fault (a folder that cannot be listed) from an entry that is
    simply not a file (a named pipe, a broken link).
    """

    rel: str
    problem: str | None = None
    unreadable: bool = False


def walk_files(root: str, after: str | None = None) -> Iterator[str]:
    """Yield the relative posix paths of the regular files under ``root``, in a fixed order.

    The regular files of :func:`walk_entries`, which see.
    """
    for entry in walk_entries(root, after):
        if entry.problem is None:
            yield entry.rel


def walk_entries(root: str, after: str | None = None) -> Iterator[Entry]:
    """Yield every entry under ``root`` that is not a folder, in a fixed order.

    The order is depth-first with each directory's entries sorted by name, which equals
    the order of the paths' component tuples; with ``after`` (a path yielded before) the
    walk resumes strictly after it without visiting what came before. Only one directory
    listing per level is held in memory. At the root of an Orthanc storage area the SQLite
    ``index`` and its sidecar files are left out.

    Symbolic links to folders are followed when they lead out of ``root`` (a link to a
    folder inside ``root`` is not: its files are listed once, under their real path); a
    set of the (device, inode) of the folders entered stops loops. Named pipes, sockets,
    devices and broken links are yielded with a ``problem`` (never opened: opening a pipe
    would block), and so is a folder that cannot be listed, so that each becomes a row of
    its own rather than an error that stops the listing.
    """
    root = os.path.abspath(root)
    skip = set(INDEX_SIDECARS) if is_sqlite(os.path.join(root, INDEX_NAME)) else set()
    cursor = after.split("/") if after else []
    real_root = os.path.join(os.path.realpath(root), "")
    visited: set[tuple[int, int]] = set()
    yield from _walk(root, "", cursor, skip, real_root, visited)


def _walk(
    directory: str,
    prefix: str,
    cursor: list[str],
    skip: set[str],
    real_root: str,
    visited: set[tuple[int, int]],
) -> Iterator[Entry]:
    try:
        st = os.stat(directory)
        visited.add((st.st_dev, st.st_ino))
        with os.scandir(directory) as it:
            entries = sorted(_kind(e) for e in it if e.name not in skip)
    except OSError as exc:
        if not prefix:
            raise  # the root itself: the caller says what is wrong with the path
        why = f"cannot list this folder: {_why(exc)} ({FOLDER_ADVICE})"
        yield Entry(prefix.rstrip("/"), why, True)
        return
    first = cursor[0] if cursor else None
    for name, kind, problem in entries:
        rest: list[str] = []
        if first is not None:
            if name < first:
                continue
            matched, first = name == first, None
            if matched and kind != _DIR:
                # The cursor entry itself, or a file sorting before a deeper cursor.
                continue
            if matched:
                # Resume inside; an empty rest means all of it sorts after the cursor.
                rest = cursor[1:]
        if kind == _FILE:
            yield Entry(prefix + name)
        elif kind == _DIR:
            path = os.path.join(directory, name)
            if _follow(path, real_root, visited, symlink=problem == "link"):
                yield from _walk(path, f"{prefix}{name}/", rest, set(), real_root, visited)
        else:
            yield Entry(prefix + name, problem)


def _kind(entry: os.DirEntry[str]) -> tuple[str, int, str | None]:
    """(name, _FILE, None), (name, _DIR, None or "link"), or (name, _OTHER, why it is not
    a file). Plain files and folders cost no system call (the listing's d_type says)."""
    name = entry.name
    try:
        if entry.is_file(follow_symlinks=False):
            return name, _FILE, None
        if entry.is_dir(follow_symlinks=False):
            return name, _DIR, None
        if entry.is_symlink():
            if entry.is_dir():
                return name, _DIR, "link"
            if entry.is_file():
                return name, _FILE, None
            if not os.path.exists(entry.path):
                return name, _OTHER, "not a file: broken symbolic link"
            mode = os.stat(entry.path).st_mode
            return name, _OTHER, f"not a file: symbolic link to a {_special(mode)}"
        mode = entry.stat(follow_symlinks=False).st_mode
        return name, _OTHER, f"not a file: {_special(mode)}"
    except OSError as exc:
        return name, _OTHER, f"cannot read this entry: {_why(exc)}"


def _special(mode: int) -> str:
    for test, name in _SPECIAL:
        if test(mode):
            return name
    return "special file"


def _follow(path: str, real_root: str, visited: set[tuple[int, int]], *, symlink: bool) -> bool:
    if not symlink:
        return True
    try:
        if os.path.join(os.path.realpath(path), "").startswith(real_root):
            # Inside the tree: the walk reaches (or reached) it under its real path.
            return False
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) not in visited


def _why(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__


class Listed(NamedTuple):
    """One row of a bare folder's listing, from :func:`iter_tree`.

    ``rel`` and ``member`` are the listing's cursor: the walk path of the file, and for a
    member of a ZIP archive its position in the archive (None for a file, and for the
    one row of a damaged or empty archive). ``failure`` is None, or why the entry could
    not be read (the import saves the row `rejected`).
    """

    rel: str
    member: tuple[int, ...] | None
    cand: Candidate
    failure: str | None


def iter_tree(
    root: str, after: str | None = None, member: tuple[int, ...] | None = None
) -> Iterator[Listed]:
    """Classify every entry of a bare folder, in :func:`walk_entries` order (resumable).

    Each ZIP archive is opened and its members listed in its place (see
    :mod:`migrator.ends.folder.archives`). Pass the last row's ``rel`` and ``member`` as
    ``after`` and ``member`` to resume: the rest of that archive first, then the walk after it. The
    candidate's ``source_key`` and ``path`` are in ledger form (:func:`escape_name`,
    :func:`ledger_path`). An entry that cannot be read (a file or folder without read
    permission, a read error, a damaged archive) is a row of its own with its
    ``failure``, not an error that stops the listing.
    """
    from migrator.ends.folder import archives  # imported here: it builds on this module (a cycle)

    root = os.path.abspath(root)
    if after is not None and member:
        # The listing stopped inside this archive: its remaining members first.
        for row in archives.iter_archive(os.path.join(root, after), after, member):
            yield Listed(after, row.position or None, row.cand, row.failure)
    for entry in walk_entries(root, after):
        path = os.path.join(root, entry.rel)
        failure = entry.problem if entry.unreadable else None
        if entry.problem is not None:
            cand = _not_read(entry.rel, path, entry.problem)
        else:
            try:
                cand = classify_file(path, root)
            except FileNotFoundError:
                continue  # deleted since the folder was read: no longer part of it
            except OSError as exc:
                failure = f"cannot read this file: {_why(exc)}"
                cand = _not_read(entry.rel, path, failure)
            else:
                # Only what is not DICOM may be an archive (a DICOM file named .zip is
                # sent as the DICOM file it is).
                if cand.orthanc_id is None and cand.size and archives.is_archive(path):
                    for row in archives.iter_archive(path, entry.rel):
                        yield Listed(entry.rel, row.position or None, row.cand, row.failure)
                    continue
        cand.source_key = escape_name(cand.source_key)
        cand.path = ledger_path(cand.path)
        yield Listed(entry.rel, None, cand, failure)


def iter_folder(root: str, after: str | None = None) -> Iterator[Candidate]:
    """Classify every entry of a bare folder, in :func:`walk_entries` order (resumable).

    Entries that cannot be read come as skipped candidates with the reason.
    """
    for row in iter_tree(root, after):
        yield row.cand


def _not_read(rel: str, path: str, reason: str) -> Candidate:
    return Candidate(rel, path, skip_reason=reason)


# --- names that are not UTF-8 ------------------------------------------------------------

# A ledger path not starting with "/" carries escapes; real paths here are all absolute.
_ESCAPED = "escaped:"
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def escape_name(name: str, reserved: str = "") -> str:
    """Return ``name`` as text any database accepts, one text per name.

    A name the file system gave with undecodable bytes (``os.fsdecode`` turns them into
    lone surrogates, which neither SQLite nor PostgreSQL store) is written with ``\\xNN``
    for each such byte and ``\\\\`` for a backslash. A valid UTF-8 name is unchanged,
    unless it already holds such a sequence: then its backslashes are doubled too, so
    that no two names share a text. The ASCII characters of ``reserved`` (a separator
    the text must not hold) are written ``\\xNN`` too. :func:`unescape_name` undoes it.
    """
    try:
        name.encode("utf-8")
        if not any(c in name for c in reserved) and ("\\" not in name or not _ESCAPE.search(name)):
            return name
    except UnicodeEncodeError:
        pass
    out = []
    for char in name:
        if char == "\\":
            out.append("\\\\")
        elif "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char in reserved:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def unescape_name(text: str) -> bytes:
    """The bytes of a name written by :func:`escape_name`."""
    if "\\" not in text:
        return text.encode("utf-8", "surrogateescape")
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        raw += text[pos : match.start()].encode("utf-8")
        code = match.group(1)
        raw += b"\\" if code == "\\" else bytes([int(code[1:], 16)])
        pos = match.end()
    raw += text[pos:].encode("utf-8")
    return bytes(raw)


def ledger_path(path: str) -> str:
    """The form of an absolute ``path`` stored in the ledger: itself, or when it is not
    valid UTF-8, :func:`escape_name` of it behind a marker; :func:`real_path` undoes it."""
    escaped = escape_name(path)
    return path if escaped is path else _ESCAPED + escaped


def real_path(text: str) -> str:
    """The file system path of a ledger path written by :func:`ledger_path`."""
    if not text.startswith(_ESCAPED):
        return text
    return os.fsdecode(unescape_name(text[len(_ESCAPED) :]))


def is_sqlite(path: str) -> bool:
    """Whether ``path`` is a file that starts like an SQLite database."""
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == SQLITE_MAGIC
    except (IsADirectoryError, FileNotFoundError, NotADirectoryError):
        return False
