"""Classification of single files found in a folder to import.

A folder may be an old Orthanc storage area (files named by UUID, possibly stored with
Orthanc's "zlib with size" compression, next to JSON summaries and header-only copies) or
any tree of DICOM files. :func:`classify_file` decides, from the bytes alone, whether a
file is a DICOM instance to send and, if not, why it is skipped. :func:`read_dicom_bytes`
returns the exact bytes to upload.

A file is never called "not DICOM" on a guess: only when it is positively something else
(a JSON summary or other JSON, text, an image, a document, an archive...) or when neither
the fast header reader nor pydicom (forced, for datasets without preamble or file meta
information in any transfer syntax) finds its identifiers. A file that no reader can make
sense of and that is not positively something else is *undecided*: it is offered to the
target, whose verdict is recorded (see :attr:`Candidate.undecided`).
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
import stat
from dataclasses import dataclass

from migrator.ends.compression import (
    CorruptFile,
    decompress_zlib_with_size,
    is_zlib_with_size,
)
from migrator.ends.dicomid import orthanc_instance_id
from migrator.ends.folder.dicomhead import (
    Header,
    Unsupported,
    element_header_size,
    read_header,
)
from migrator.ends.folder.dicomread import (
    DEFLATED_TS,
    UNDEFINED_LENGTH,
    all_uids,
    has_uids,
    inflated_header,
    inflated_start,
    out_of_order_header,
    pydicom_header,
)
from migrator.ends.folder.sniff import (
    SKIP_JSON,
    json_reason,
    looks_like_dataset,
    other_format,
    starts_like_element,
)

# The name tests compare the fast reader with.
_pydicom_header = pydicom_header

__all__ = [
    "DICOMDIR_SOP_CLASS",
    "HELD_REASONS",
    "HELD_STORAGE",
    "HELD_TREE",
    "SKIP_JSON",
    "SKIP_NO_PIXELS",
    "Candidate",
    "CorruptFile",
    "classify_file",
    "decompress_zlib_with_size",
    "is_zlib_with_size",
    "read_cached",
    "read_dicom_bytes",
    "stored_bytes",
]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

SKIP_HEADER_ONLY = "header-only copy (DicomUntilPixelData)"
# Bare folders: a copy without pixel data whose instance also has a copy with them.
SKIP_NO_PIXELS = "copy without pixel data (the folder holds a copy of this instance with pixels)"
# An image without pixel data is either a header-only copy (Orthanc's DicomUntilPixelData,
# which must never be sent: the target would answer "AlreadyStored" to the real file
# later) or a valid instance without pixels (MR spectroscopy, some structured objects).
# Only the other files of the folder tell which, so such a file is listed skipped with
# one of these reasons, and the ledger settles it once the listing is complete
# (``Ledger.settle_held_copies``): skipped as a header-only copy (Orthanc storage layout)
# or as a copy without pixels (any other folder) when a copy with pixel data of its
# instance is listed, sent otherwise. The storage form starts like SKIP_HEADER_ONLY, so
# that ``retry --state skipped`` leaves it alone meanwhile.
HELD_STORAGE = "header-only copy? (no pixel data; held until the listing is complete)"
HELD_TREE = "copy without pixel data? (held until the listing is complete)"
HELD_REASONS = {HELD_STORAGE: SKIP_HEADER_ONLY, HELD_TREE: SKIP_NO_PIXELS}
SKIP_DICOMDIR = "DICOMDIR"
SKIP_EMPTY = "empty file"
NOT_DICOM_NO_UIDS = "not DICOM: no DICOM identifiers found"
NOT_DICOM_NO_ELEMENT = "not DICOM: does not start with a DICOM element"

# Where Orthanc keeps an attachment: xx/yy/uuid, xx and yy the uuid's first four digits.
_STORAGE_KEY = re.compile(
    r"^([0-9a-f]{2})/([0-9a-f]{2})/(\1\2[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)
# DICOM files up to this size are read whole; bigger ones are mapped (only their header
# is read). A CT slice (~0.5 MiB) read whole cost ~0.9 ms to list, mapped ~0.07 ms.
_READ_WHOLE = 64 << 10
# Bytes asked for first when a file is read whole (then what its size says is left).
_READ_STEP = 64 << 10


# Not frozen: a frozen dataclass sets each field through object.__setattr__, 3 µs per
# Candidate against 0.6 µs, on a path that builds one per index row or file.
@dataclass(slots=True)
class Candidate:
    """One file of a source folder, as the import sees it.

    ``skip_reason`` is None when the file is to be sent, otherwise a short human reason.
    ``problem`` notes a defect that does not stop the upload (the target decides), e.g.
    pixel data shorter than declared. ``missing`` is set for index rows whose file is gone.
    """

    source_key: str
    path: str
    orthanc_id: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    size: int | None = None
    md5: str | None = None
    has_pixels: bool | None = None
    compressed: bool = False
    skip_reason: str | None = None
    missing: bool = False
    problem: str | None = None
    undecided: str | None = None
    # What a selection of studies looks at (`migrator.selection`); modalities as
    # ModalitiesInStudy says, else the file's own Modality (backslash-separated).
    patient_id: str | None = None
    study_date: str | None = None
    accession: str | None = None
    modalities: str | None = None


def read_dicom_bytes(path: str, compressed: bool | None = None) -> bytes:
    """Return the bytes to upload for ``path``, decompressed when stored compressed.

    ``compressed=None`` sniffs the file; True/False trust the caller (e.g. the index's
    compressionType). Raises :class:`CorruptFile` on a bad zlib stream or size mismatch.
    """
    return stored_bytes(_read_whole(path), compressed)


def stored_bytes(raw: bytes, compressed: bool | None = None) -> bytes:
    """The bytes to upload for a file that holds `raw` (see `read_dicom_bytes`)."""
    if compressed is None:
        compressed = is_zlib_with_size(raw[:10])
        if compressed and raw[128:132] == b"DICM":
            # A Part-10 file whose preamble happens to look like a size + zlib header.
            try:
                return decompress_zlib_with_size(raw)
            except CorruptFile:
                return raw
    if not compressed:
        return raw
    if not raw:
        # Orthanc stores an empty input as an empty file, without size prefix.
        return b""
    return decompress_zlib_with_size(raw)


def read_cached(path: str, limit: int) -> bytes | None:
    """A file's bytes, when it is at most `limit` bytes long and all of them are in the
    page cache (read without waiting for a disk: ``RWF_NOWAIT``); else None, and the
    caller reads it on a thread. An event loop reads a cached file so at a fraction of a
    thread hand-off's cost (0.5 MiB CT slices into a storescp: ~0.6 ms of CPU less each),
    and is never held up by a disk, a network share or an error (any is left to the
    thread's read to raise)."""
    if _NOWAIT is None:
        return None
    try:
        # Non-blocking: a pipe put in the file's place must not hold the event loop.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        size = info.st_size
        if size > limit or not stat.S_ISREG(info.st_mode):
            return None
        # One byte more than the size: a file that grew since is left to the thread.
        buffer = bytearray(size + 1)
        read = os.preadv(fd, [buffer], 0, _NOWAIT)
    except OSError:  # not cached (EAGAIN), or a file system that cannot say
        return None
    finally:
        os.close(fd)
    if read != size:
        return None  # partly cached, or changed meanwhile
    return bytes(memoryview(buffer)[:read])


# Linux (4.14+) only: elsewhere `read_cached` leaves every file to a thread.
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None


def _read_whole(path: str) -> bytes:
    """A file's bytes, in half the system calls of `open(path, "rb").read()` (no fstat,
    isatty or seek): each lets go of the GIL, and a busy run's event loop, which reads
    small files itself, waits to get it back after every one."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        parts = []
        step = _READ_STEP
        while chunk := os.read(fd, step):
            parts.append(chunk)
            if len(chunk) == step:
                # A large file: the rest in one read (a buffer of that size, once).
                step = max(os.fstat(fd).st_size - sum(map(len, parts)), 0) + 1
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def classify_file(path: str, root: str | None = None) -> Candidate:
    """Classify one file of a bare folder (no index) without sending anything.

    ``source_key`` is ``path`` relative to ``root`` in posix form (the absolute path when
    ``root`` is None). Only the DICOM header is parsed; compressed files are decompressed
    in memory, big files are mapped rather than read. Raises ``OSError`` only when the
    file cannot be read.
    """
    abspath = os.path.abspath(path)
    key = _source_key(abspath, root)
    with open(abspath, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(132)
        if not head:
            return _skipped(key, abspath, SKIP_EMPTY, size=0)
        compressed = is_zlib_with_size(head)
        other = None if compressed or head[128:132] == b"DICM" else other_format(head)
        if other is not None:
            # Photos, documents, text...: the first bytes tell, the rest is never read.
            return _skipped(key, abspath, other, size=size)
        if compressed:
            raw = head + fh.read()
            try:
                data = decompress_zlib_with_size(raw)
            except CorruptFile as exc:
                if head[128:132] != b"DICM":
                    return _skipped(key, abspath, f"corrupt compressed file: {exc}", True)
                return _classify_bytes(key, abspath, raw, False, None)
            md5 = hashlib.md5(data).hexdigest()
            return _classify_bytes(key, abspath, data, True, md5)
        if size <= _READ_WHOLE:
            return _classify_bytes(key, abspath, head + fh.read(), False, None)
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without mmap: read it
            return _classify_bytes(key, abspath, head + fh.read(), False, None)
        with mapped:
            return _classify_bytes(key, abspath, mapped, False, None)


def _source_key(abspath: str, root: str | None) -> str:
    if root is None:
        return abspath.replace(os.sep, "/")
    prefix = _root_prefix(root)
    if prefix is not None and abspath.startswith(prefix):
        # The common case without `relpath` (a sixth of the cost of listing a small file).
        return abspath[len(prefix) :].replace(os.sep, "/")
    return os.path.relpath(abspath, os.path.abspath(root)).replace(os.sep, "/")


@functools.lru_cache(maxsize=64)
def _root_prefix(root: str) -> str | None:
    """An absolute root's normal form with a trailing separator: the start of the paths
    under it (None for a relative root, which depends on the working folder)."""
    if not os.path.isabs(root):
        return None
    return os.path.join(os.path.normpath(root), "")


def _skipped(
    key: str, path: str, reason: str, compressed: bool = False, size: int | None = None
) -> Candidate:
    return Candidate(key, path, size=size, compressed=compressed, skip_reason=reason)


def _classify_bytes(
    key: str, path: str, data: bytes | mmap.mmap, compressed: bool, md5: str | None
) -> Candidate:
    size = len(data)
    head = data[:132]
    if size == 0:
        return _skipped(key, path, SKIP_EMPTY, compressed, 0)
    # The DICM marker first: a Part-10 file's 128-byte preamble is free-form and may
    # well start with "{" or look like text or an image (TIFF/DICOM dual files).
    part10 = head[128:132] == b"DICM"
    if not part10:
        other = json_reason(data) if head.lstrip()[:1] == b"{" else None
        other = other or other_format(head, brace_is_text=True)
        if other is None and not starts_like_element(head, size):
            # Not worth a parse (which costs as much as a small upload), unless deflated.
            plain = inflated_start(data)
            if not starts_like_element(plain, 1 << 32):
                other = NOT_DICOM_NO_ELEMENT
        if other is not None:
            return _skipped(key, path, other, compressed, size)
    known_pixels = True
    try:
        header = read_header(data)
    except Unsupported:
        try:
            # Forced: a dataset without preamble or file meta information, in any of the
            # uncompressed transfer syntaxes, is read as DICOM readers (DCMTK) read it.
            header = pydicom_header(data, force=True)
        except Exception as exc:  # pydicom raises many types on garbage input
            why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            return _undecided(key, path, f"no reader could parse it ({why})", compressed, size, md5)
        if not part10 and not has_uids(header):
            # Deflated, without the file meta information that would say so.
            inflated = inflated_header(data)
            if inflated is not None:
                header, known_pixels = inflated, False
    if not all_uids(header):
        # A dataset written out of order (which the target reads) may hold its
        # identifiers after the pixel data, where the readers stop, and mislead pydicom's
        # guess of the encoding of a dataset without file meta information.
        header = out_of_order_header(data, header, part10)

    if header.sop_class == DICOMDIR_SOP_CLASS:
        return _skipped(key, path, SKIP_DICOMDIR, compressed, size)
    uids = {
        "StudyInstanceUID": header.study_uid,
        "SeriesInstanceUID": header.series_uid,
        "SOPInstanceUID": header.sop_uid,
    }
    absent = [k for k, v in uids.items() if not v]
    if absent:
        if len(absent) == len(uids) and not part10 and not looks_like_dataset(head):
            # Neither reader found an identifier in what does not even start like DICOM.
            return _skipped(key, path, NOT_DICOM_NO_UIDS, compressed, size)
        # Either incomplete DICOM, or DICOM the readers lost their way in (an unknown
        # VR, say) where the target's reader does not: only the target can tell.
        why = f"no {', '.join(absent)} found"
        return _undecided(key, path, why, compressed, size, md5)

    has_pixels = header.pixel is not None if known_pixels else None
    skip = None
    if has_pixels is False and header.rows_and_columns:
        # Header-only copy or an instance without pixels: see HELD_STORAGE.
        skip = HELD_STORAGE if _STORAGE_KEY.match(key) else HELD_TREE
    problem = _truncation(header, size)
    return Candidate(
        source_key=key,
        path=path,
        orthanc_id=orthanc_instance_id(
            header.patient_id, header.study_uid, header.series_uid, header.sop_uid
        ),
        sop_uid=header.sop_uid,
        study_uid=header.study_uid,
        series_uid=header.series_uid,
        size=size,
        md5=md5,
        has_pixels=has_pixels,
        compressed=compressed,
        skip_reason=skip,
        problem=problem,
        patient_id=header.patient_id,
        study_date=header.study_date,
        accession=header.accession,
        modalities=header.modalities_in_study or header.modality,
    )


def _undecided(
    key: str, path: str, why: str, compressed: bool, size: int, md5: str | None
) -> Candidate:
    """A file to offer to the target, which alone can tell whether it is DICOM."""
    return Candidate(key, path, size=size, md5=md5, compressed=compressed, undecided=why)


def _truncation(header: Header, size: int) -> str | None:
    if header.pixel is None:
        return None
    vr, length, offset = header.pixel
    if length == UNDEFINED_LENGTH or header.transfer_syntax == DEFLATED_TS:
        # Encapsulated or deflated data cannot be measured without reading it all.
        return None
    available = size - offset - element_header_size(vr)
    if available < length:
        return f"truncated DICOM: pixel data has {max(available, 0)} of {length} bytes"
    return None
