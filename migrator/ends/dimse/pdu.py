"""DICOM upper-layer PDUs and DIMSE command sets for storing files, with the standard
library only (PS3.8 9.3, PS3.7 9.3 and 9.1.5): the file meta of a Part-10 file read
without parsing the dataset, the presentation contexts a file needs, the association
request and its answer, C-STORE-RQ and C-ECHO-RQ messages as P-DATA-TF PDUs, and the
status of a response.

Nothing here imports pydicom or pynetdicom: a run that only stores files does without
both (a third of a second of start-up).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "NATIVE",
    "Accepted",
    "FileMeta",
    "associate_rq",
    "command_fields",
    "context_key",
    "echo_rq_command",
    "parse_accept",
    "pdata_parts",
    "pdata_pdus",
    "read_meta",
    "store_rq_command",
    "syntaxes_for",
]

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# pynetdicom's implementation identifiers: the associations opened here are its own, on
# the wire, and peers that log or filter by them see the same as before.
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.3.0.4"
IMPLEMENTATION_VERSION = "PYNETDICOM_304"

# Transfer syntaxes a dataset can be re-encoded between without touching its pixel data.
NATIVE = (EXPLICIT_LE, IMPLICIT_LE)
# Transfer syntaxes re-encoded between (the pixel data as they are).
UNCOMPRESSED = frozenset({EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE})

# PDU types (PS3.8 9.3.1).
ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 2, 3, 4, 5, 6, 7
# Command fields of the responses read here.
C_STORE_RSP, C_ECHO_RSP = 0x8001, 0x8030


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
    if transfer_syntax in UNCOMPRESSED:
        return (sop_class, "native")
    return (sop_class, transfer_syntax)


def syntaxes_for(key: tuple[str, str], first: str | None = None) -> list[str]:
    """The transfer syntaxes proposed for `key` (from `context_key`): a compressed file's
    own; for the others explicit and implicit VR little endian (the first file's own
    first) and the first file's own syntax."""
    group = key[1]
    if group != "native":
        return [group]
    syntaxes = list(NATIVE)
    if first in syntaxes:
        syntaxes.remove(first)
        syntaxes.insert(0, first)
    elif first:
        # Deflated or big endian last: files of this context in explicit or implicit VR
        # would otherwise all be re-encoded into it.
        syntaxes.append(first)
    return syntaxes


# -- association negotiation -------------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")[:16]


def associate_rq(
    called: str, calling: str, contexts: list[tuple[str, list[str]]], max_length: int = 0
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing `contexts` (abstract syntax, transfer
    syntaxes), with IDs 1, 3, 5...; `max_length` is the largest P-DATA-TF we take (0: any)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for index, (abstract, syntaxes) in enumerate(contexts):
        body = struct.pack(">BBBB", 2 * index + 1, 0, 0, 0) + _item(0x30, abstract.encode())
        body += b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items.append(_item(0x20, body))
    user = (
        _item(0x51, struct.pack(">I", max_length))
        + _item(0x52, IMPLEMENTATION_UID.encode())
        + _item(0x55, IMPLEMENTATION_VERSION.encode())
    )
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32) + b"".join(items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@dataclass
class Accepted:
    """An A-ASSOCIATE-AC read: context ID -> the transfer syntax accepted (contexts the
    peer refused are left out), and the largest P-DATA-TF the peer takes (0: any)."""

    contexts: dict[int, str]
    max_length: int


def parse_accept(body: bytes) -> Accepted:
    """The A-ASSOCIATE-AC PDU's body (after its 6-byte header)."""
    contexts: dict[int, str] = {}
    max_length = 0
    pos = 68
    while pos + 4 <= len(body):
        kind, _, length = struct.unpack_from(">BBH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if kind == 0x21 and len(value) >= 4:
            context_id, result = value[0], value[2]
            sub = 4
            while sub + 4 <= len(value):
                sub_kind, _, sub_length = struct.unpack_from(">BBH", value, sub)
                if sub_kind == 0x40 and result == 0:
                    ts = value[sub + 4 : sub + 4 + sub_length].rstrip(b"\0 ").decode("ascii")
                    contexts[context_id] = ts
                sub += 4 + sub_length
        elif kind == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_kind, _, sub_length = struct.unpack_from(">BBH", value, sub)
                if sub_kind == 0x51 and sub_length == 4:
                    (max_length,) = struct.unpack_from(">I", value, sub + 4)
                sub += 4 + sub_length
    return Accepted(contexts, max_length)


# -- DIMSE messages ----------------------------------------------------------------------


def _element(element: int, value: bytes) -> bytes:
    """A command element of group 0000, implicit VR little endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def store_rq_command(msg_id: int, sop_class: str, sop_uid: str) -> bytes:
    """The command set of a C-STORE-RQ with a dataset (PS3.7 9.3.1.1), as pynetdicom
    encodes it: priority low, no move originator."""
    return _command(
        _element(0x0002, _uid(sop_class)),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", msg_id)),
        _element(0x0700, struct.pack("<H", 0x0002)),
        _element(0x0800, struct.pack("<H", 0x0001)),
        _element(0x1000, _uid(sop_uid)),
    )


def echo_rq_command(msg_id: int) -> bytes:
    """The command set of a C-ECHO-RQ (PS3.7 9.3.5.1)."""
    return _command(
        _element(0x0002, _uid(VERIFICATION)),
        _element(0x0100, struct.pack("<H", 0x0030)),
        _element(0x0110, struct.pack("<H", msg_id)),
        _element(0x0800, struct.pack("<H", 0x0101)),
    )


def pdata_pdus(
    context_id: int, command: bytes, dataset: memoryview | None, max_length: int
) -> Iterator[bytes]:
    """A DIMSE message as P-DATA-TF PDUs of one PDV each (PS3.8 9.3.5, E.2): the command
    set, then the dataset (None: none), in fragments of at most `max_length` - 6 bytes
    (0: the peer takes any length)."""
    parts = pdata_parts(context_id, command, dataset, max_length)
    for header in parts:
        yield header + next(parts)


def pdata_parts(
    context_id: int, command: bytes, dataset: memoryview | None, max_length: int
) -> Iterator[bytes | memoryview]:
    """`pdata_pdus` as each PDU's header then its fragment (a view of the dataset, not a
    copy): joined once into what is written."""
    payloads = [(memoryview(command), 1)]
    if dataset is not None:
        payloads.append((dataset, 0))
    for payload, command_bit in payloads:
        step = max_length - 6 if max_length > 6 else max(len(payload), 1)
        at = 0
        while True:
            fragment = payload[at : at + step]
            at += len(fragment)
            last = at >= len(payload)
            yield pdv_header(context_id, len(fragment), command_bit | (0x02 if last else 0x00))
            yield fragment
            if last:
                break


def pdv_header(context_id: int, length: int, control: int) -> bytes:
    """The header of a P-DATA-TF PDU of one PDV of `length` bytes: PDU type and length,
    PDV length, context ID and the control byte (0x01 command, 0x02 last fragment)."""
    return struct.pack(">BBIIBB", 0x04, 0x00, length + 6, length + 2, context_id, control)


def dataset_parts(
    context_id: int, chunk: memoryview, sent: int, length: int, max_length: int
) -> Iterator[bytes | memoryview]:
    """`pdata_parts` for a part of a dataset of `length` bytes that comes in chunks:
    `chunk` follows the `sent` bytes before it. Its fragments end with it (a PDV may be
    shorter than the peer's maximum), the last fragment of the dataset flagged last."""
    step = max_length - 6 if max_length > 6 else max(len(chunk), 1)
    at = 0
    while at < len(chunk):
        fragment = chunk[at : at + step]
        at += len(fragment)
        yield pdv_header(context_id, len(fragment), 0x02 if sent + at >= length else 0x00)
        yield fragment


def command_fields(command: bytes) -> dict[int, int]:
    """The US elements of a response's command set (implicit VR little endian): element
    number -> value (CommandField 0x0100, MessageIDBeingRespondedTo 0x0120, Status
    0x0900...); other elements are skipped."""
    fields: dict[int, int] = {}
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, pos)
        pos += 8
        if group == 0x0000 and length == 2:
            (fields[element],) = struct.unpack_from("<H", command, pos)
        pos += length
    return fields
