"""DICOM files on the wire: the file meta of a Part-10 file read without parsing the
dataset, presentation contexts for them, a C-STORE of a dataset's bytes as they are, and
the C-FIND queries both ends ask.
"""

from __future__ import annotations

import io
import itertools
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from migrator.errors import Kind, TransferError, Verdict, verdict_for_dimse_status

__all__ = [
    "FIND_MODEL",
    "NATIVE",
    "FileMeta",
    "context_for",
    "context_key",
    "find",
    "pause_reactor",
    "read_meta",
    "store_bytes",
]

FIND_MODEL = StudyRootQueryRetrieveInformationModelFind
# Transfer syntaxes a dataset can be re-encoded between without touching its pixel data.
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Transfer syntaxes pynetdicom re-encodes between (the pixel data as they are).
_UNCOMPRESSED = {
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
}
_message_ids = itertools.count(1)


@dataclass(frozen=True)
class FileMeta:
    """What a C-STORE needs from a Part-10 file: its SOP class and instance, its transfer
    syntax, and where the dataset starts (after the file meta)."""

    sop_class: str
    sop_uid: str
    transfer_syntax: str
    offset: int


def read_meta(data: bytes) -> FileMeta | None:
    """The file meta of a Part-10 file (explicit VR little endian group 0002, read
    element by element), or None when `data` does not start like one."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    pos = 132
    values: dict[int, bytes] = {}
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        values[element] = data[start : start + length]
        pos = start + length
    try:
        sop_class, sop_uid, ts = (
            values[e].rstrip(b"\0 ").decode("ascii") for e in (0x0002, 0x0003, 0x0010)
        )
    except (KeyError, UnicodeDecodeError):
        return None
    if not (sop_class and sop_uid and ts):
        return None
    return FileMeta(sop_class, sop_uid, ts, pos)


def context_key(sop_class: str, transfer_syntax: str) -> tuple[str, str]:
    """Files that one presentation context can carry: an uncompressed (or deflated) file
    goes in its SOP class's native context (its own syntax, else explicit or implicit VR,
    re-encoded if need be); a compressed one needs a context of its own, sent as it is."""
    if transfer_syntax in _UNCOMPRESSED:
        return (sop_class, "native")
    return (sop_class, transfer_syntax)


def context_for(key: tuple[str, str], first: str | None = None) -> PresentationContext:
    """The presentation context proposed for `key` (from `context_key`): a compressed
    file's own transfer syntax; for the others explicit and implicit VR little endian
    (the first file's own first) and the first file's own syntax."""
    sop_class, group = key
    if group != "native":
        return build_context(sop_class, [group])
    syntaxes = list(NATIVE)
    if first in syntaxes:
        syntaxes.remove(first)
        syntaxes.insert(0, first)
    elif first:
        # Deflated or big endian last: files of this context in explicit or implicit VR
        # would otherwise all be re-encoded into it.
        syntaxes.append(first)
    return build_context(sop_class, syntaxes)


def store_bytes(assoc: Association, data: bytes, meta: FileMeta | None) -> int | None:
    """C-STORE one file over `assoc` (blocking); the response's status, None without one.

    The dataset's bytes go out as they are when the peer accepted the file's transfer
    syntax (no decoding, no re-encoding). Otherwise the dataset is parsed and pynetdicom
    re-encodes it into the accepted one (only uncompressed files are proposed so).
    Raises TransferError (permanent) when the peer accepted no context for the file.
    """
    if meta is not None:
        context = _accepted(assoc, meta.sop_class, meta.transfer_syntax)
        if context is not None and hasattr(assoc, "_reactor_checkpoint"):
            return _send_raw(assoc, context.context_id, meta, memoryview(data)[meta.offset :])
    try:
        dataset = dcmread(io.BytesIO(data), force=True)
        sop_class = str(dataset.SOPClassUID)
        ts = str(dataset.file_meta.TransferSyntaxUID)
    except Exception as exc:
        raise TransferError(
            Verdict(Kind.PERMANENT, f"cannot read the file to send it: {exc}")
        ) from None
    if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
        raise TransferError(
            Verdict(
                Kind.PERMANENT,
                f"target accepts no presentation context for SOP class {sop_class} in "
                f"transfer syntax {UID(ts).name}",
            )
        )
    try:
        status = assoc.send_c_store(dataset, msg_id=next(_message_ids) % 65536)
    except ValueError as exc:
        raise TransferError(
            Verdict(Kind.PERMANENT, f"target accepts no presentation context for the file: {exc}")
        ) from None
    return int(status.Status) if "Status" in status else None


def _accepted(assoc: Association, sop_class: str, ts: str) -> Any:
    for context in assoc.accepted_contexts:
        if context.abstract_syntax == sop_class and context.transfer_syntax[0] == ts:
            return context
    return None


def _send_raw(
    assoc: Association, context_id: int, meta: FileMeta, dataset: memoryview
) -> int | None:
    """pynetdicom's `send_c_store` with the encoded dataset given as it is (pynetdicom
    3.0's own steps: pause the association's reactor, send, wait for the response)."""
    req = C_STORE()
    req.MessageID = next(_message_ids) % 65536
    req.Priority = 2
    req.AffectedSOPClassUID = meta.sop_class
    req.AffectedSOPInstanceUID = meta.sop_uid
    req.DataSet = io.BytesIO(dataset)
    pause_reactor(assoc)
    try:
        assoc.dimse.send_msg(req, context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return None
    status = assoc._check_received_status(rsp)
    return int(status.Status) if "Status" in status else None


def pause_reactor(assoc: Association) -> None:
    """Hold the association's reactor thread, so that it does not take our response off
    the queue (before a C-STORE here, or pynetdicom's C-FIND, C-GET, C-MOVE, which hold it
    again and let it go when their answer ends). pynetdicom waits for its `_is_paused`
    flag, which is already True for a moment after the reactor passed its checkpoint: the
    response could then be taken (and the store wait for it until the DIMSE timeout, seen
    about once in a thousand stores). Here the wait lasts until the reactor is blocked on
    the checkpoint itself."""
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    deadline = time.monotonic() + 1.0
    while True:
        blocked = len(waiters) > 0 if waiters is not None else assoc._is_paused
        # A reactor that ended (association gone) never blocks: the send then fails.
        if blocked or not assoc.is_alive() or time.monotonic() > deadline:
            return
        time.sleep(0.0001)


def find(assoc: Association, query: Dataset, side: str) -> tuple[list[Dataset], Verdict | None]:
    """A Study Root C-FIND (blocking): the matches, and the classified failure that ended
    the answer early, if any (None: complete)."""
    matches: list[Dataset] = []
    final: int | None = None
    pause_reactor(assoc)
    for status, identifier in assoc.send_c_find(query, FIND_MODEL):
        if not status or "Status" not in status:
            final = None
            break
        final = int(status.Status)
        if final in (0xFF00, 0xFF01):
            if identifier is not None:
                matches.append(identifier)
            continue
        break
    if final == 0x0000:
        return matches, None
    return matches, verdict_for_dimse_status(final, side=side, operation="C-FIND") or Verdict(
        Kind.RETRYABLE, f"{side} C-FIND ended with status 0x{final:04X}"
    )


def query(level: str, **keys: str) -> Dataset:
    """A C-FIND identifier at `level` with these keys (empty: return keys)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


def text(ds: Dataset, keyword: str) -> str:
    """A returned key as text ('' when absent or empty)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip("\0 ")


def raise_on(verdict: Verdict | None) -> None:
    """Raise the TransferError of a failed operation."""
    if verdict is not None:
        raise TransferError(verdict)


def iter_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """`items` in lists of at most `size`."""
    for at in range(0, len(items), size):
        yield items[at : at + size]
