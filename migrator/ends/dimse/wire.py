"""DICOM files on the wire: the file meta of a Part-10 file read without parsing the
dataset, presentation contexts for them, a C-STORE of a dataset's bytes as they are, and
the C-FIND queries both ends ask.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import select
import socket
import struct
import time
import weakref
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
from pynetdicom.transport import AssociationSocket

from migrator.errors import Kind, TransferError, Verdict, verdict_for_dimse_status

__all__ = [
    "FIND_MODEL",
    "NATIVE",
    "FileMeta",
    "context_for",
    "context_key",
    "find",
    "pause_reactor",
    "pdata_pdus",
    "quicken",
    "read_meta",
    "settle",
    "store_bytes",
    "store_rq_command",
    "usable",
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
# Seconds a quickened association's network thread waits for data or a doorbell at most
# (then it checks its timers, as pynetdicom's loop does every millisecond).
_DUL_WAIT = 0.02


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
    3.0's own steps: pause the association's reactor, send, wait for the response).

    The reactor stays paused after the response (until pynetdicom's own calls, a release
    or an abort let it go): it only serves requests from the peer, which a storage SCP
    does not send, and pausing it again costs up to a millisecond a store (its poll).
    `usable` tells whether a held association is still up."""
    msg_id = next(_message_ids) % 65536
    if assoc._reactor_checkpoint.is_set():
        pause_reactor(assoc)
    if getattr(assoc, "_direct", False):
        _write_store_rq(assoc, context_id, msg_id, meta, dataset)
    else:
        req = C_STORE()
        req.MessageID = msg_id
        req.Priority = 2
        req.AffectedSOPClassUID = meta.sop_class
        req.AffectedSOPInstanceUID = meta.sop_uid
        req.DataSet = io.BytesIO(dataset)
        assoc.dimse.send_msg(req, context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._reactor_checkpoint.set()
        assoc._handle_no_response()
        return None
    status = assoc._check_received_status(rsp)
    return int(status.Status) if "Status" in status else None


def _element(element: int, value: bytes) -> bytes:
    """A command element of group 0000, implicit VR little endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_rq_command(msg_id: int, sop_class: str, sop_uid: str) -> bytes:
    """The command set of a C-STORE-RQ with a dataset (PS3.7 9.3.1.1), as pynetdicom
    encodes it: priority low, no move originator."""
    body = b"".join(
        (
            _element(0x0002, _uid(sop_class)),
            _element(0x0100, struct.pack("<H", 0x0001)),
            _element(0x0110, struct.pack("<H", msg_id)),
            _element(0x0700, struct.pack("<H", 0x0002)),
            _element(0x0800, struct.pack("<H", 0x0001)),
            _element(0x1000, _uid(sop_uid)),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def pdata_pdus(
    context_id: int, command: bytes, dataset: memoryview, max_length: int
) -> Iterator[bytes]:
    """A DIMSE message as P-DATA-TF PDUs of one PDV each (PS3.8 9.3.5, E.2): the command
    set, then the dataset, in fragments of at most `max_length` - 6 bytes (0: the peer
    takes any length)."""
    for payload, command_bit in ((memoryview(command), 1), (dataset, 0)):
        step = max_length - 6 if max_length > 6 else max(len(payload), 1)
        at = 0
        while True:
            fragment = payload[at : at + step]
            at += len(fragment)
            last = at >= len(payload)
            header = struct.pack(
                ">BBIIBB",
                0x04,
                0x00,
                len(fragment) + 6,
                len(fragment) + 2,
                context_id,
                command_bit | (0x02 if last else 0x00),
            )
            yield header + fragment
            if last:
                break


# Bytes gathered into one socket write at most.
_WRITE_SIZE = 1 << 20


def _write_store_rq(
    assoc: Association, context_id: int, msg_id: int, meta: FileMeta, dataset: memoryview
) -> None:
    """Write a C-STORE-RQ on the association's socket from this thread: what pynetdicom
    would queue for its network thread, built without its per-message datasets (about half
    the CPU of a small store) and written in a few calls. Only while the association is
    established and its reactor paused: its network thread then sends nothing itself."""
    command = store_rq_command(msg_id, meta.sop_class, meta.sop_uid)
    raw = assoc.dul.socket.socket
    chunk: list[bytes] = []
    size = 0
    try:
        for pdu in pdata_pdus(context_id, command, dataset, assoc.dimse.maximum_pdu_size):
            chunk.append(pdu)
            size += len(pdu)
            if size >= _WRITE_SIZE:
                raw.sendall(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            raw.sendall(b"".join(chunk))
    except (OSError, AttributeError) as exc:
        # pynetdicom's own reaction to a connection lost while sending (Evt17).
        assoc.dul.event_queue.put("Evt17")
        raise TransferError(
            Verdict(Kind.RETRYABLE, f"target C-STORE: connection lost while sending ({exc})")
        ) from None


def usable(assoc: Association) -> bool:
    """Whether an association is established and ready for data: its state machine's
    state, which its network thread keeps even while the reactor is paused (and so has
    not yet turned a peer's abort or release into `is_established` False)."""
    if not assoc.is_established:
        return False
    machine = getattr(assoc.dul, "state_machine", None)
    return getattr(machine, "current_state", "Sta6") == "Sta6"


def settle(assoc: Association) -> None:
    """Let a held reactor see that the peer ended the association (it then marks it
    ended), waiting a moment for it; an association still established is up to the
    caller to abort."""
    if assoc.is_established and not usable(assoc):
        assoc._reactor_checkpoint.set()
        deadline = time.monotonic() + 0.5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.001)


class _DoorbellSocket(AssociationSocket):
    """pynetdicom's socket, whose `ready` (asked by the network thread on every turn of its
    loop) waits in `select` for data or the doorbell rung when something is queued to
    send, instead of answering at once and letting the loop sleep 1 ms: a response is
    read as soon as it arrives, and an idle association costs no wake-ups."""

    _bell: socket.socket

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            # pynetdicom's loop no longer sleeps: the thread must not spin until killed.
            time.sleep(_DUL_WAIT)
            return False
        try:
            select.select([self.socket, self._bell], [], [], _DUL_WAIT)
            while self._bell.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ValueError):
            # pynetdicom's own check below reports a closed connection.
            pass
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]


def quicken(assoc: Association) -> None:
    """Make an established association's network thread wait on its socket rather than
    poll it every millisecond (pynetdicom 3.0's loop): each DIMSE message spent ~1 ms
    waiting for the thread to pick up what was queued to send and ~1 ms for it to notice
    the answer. A transport other than pynetdicom's plain socket is left as it is."""
    dul = assoc.dul
    sock = dul.socket
    if type(sock) is not AssociationSocket or not hasattr(dul, "_run_loop_delay"):
        return
    bell, ringer = socket.socketpair()
    bell.setblocking(False)
    ringer.setblocking(False)
    weakref.finalize(assoc, _close_all, bell, ringer)
    dimse = assoc.dimse
    queue_message = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        # Rung once the whole message is queued: a thread woken at the first of its PDUs
        # would wait for the GIL while the others are encoded (up to the switch interval).
        queue_message(primitive, context_id)
        # Full (the thread has wake-ups pending anyway) or closed (association gone).
        with contextlib.suppress(OSError):
            ringer.send(b"\0")

    sock._bell = bell  # type: ignore[attr-defined]
    sock.__class__ = _DoorbellSocket
    dimse.send_msg = send_msg
    # C-STOREs of encoded datasets are then written from the calling thread.
    assoc._direct = True  # type: ignore[attr-defined]
    # A release or abort is queued without the bell: picked up within `_DUL_WAIT`.
    dul._run_loop_delay = 0


def _close_all(*socks: socket.socket) -> None:
    for sock in socks:
        sock.close()


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
