"""A fast reader of the few header fields an import needs from a DICOM file.

Parsing a header with pydicom costs about half a millisecond per file, more than sending
a small file to a local Orthanc. :func:`read_header` walks the top-level elements of the
common encodings (explicit and implicit VR little endian after a Part-10 preamble)
without building a dataset and keeps only what the classification of a file needs.

Whatever it does not handle the same way pydicom would (big endian, deflate, no preamble,
non-ASCII identifiers, malformed or truncated elements before the pixel
data) raises :class:`Unsupported`; the caller then parses the file with pydicom, so odd
files are classified exactly as before and only the common case is fast.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from migrator.ends.dicomid import orthanc_bytes

__all__ = ["PIXEL_TAGS", "Header", "Unsupported", "element_header_size", "read_header"]

# Float, double float and integer pixel data: where the header of an image ends.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_UNSUPPORTED_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
# Explicit-VR elements whose header carries a 4-byte length (12-byte header in total),
# and those with a 2-byte length (8 bytes); any other VR is declined.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        *(b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO"),
        *(b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"),
    }
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
_MAX_DEPTH = 32

_SOP_CLASS = 0x00020002
_TRANSFER_SYNTAX = 0x00020010
_SOP_INSTANCE = 0x00080018
# Study-level fields a selection looks at (`migrator.selection`).
_STUDY_DATE = 0x00080020
_ACCESSION = 0x00080050
_MODALITY = 0x00080060
_MODALITIES = 0x00080061
_PATIENT_ID = 0x00100020
_STUDY = 0x0020000D
_SERIES = 0x0020000E
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_WANTED = frozenset(
    {_SOP_INSTANCE, _PATIENT_ID, _STUDY, _SERIES, _ROWS, _COLUMNS}
    | {_STUDY_DATE, _ACCESSION, _MODALITY, _MODALITIES}
)

_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class Unsupported(ValueError):
    """The file is not in a form this reader handles; parse it with pydicom instead."""


@dataclass(frozen=True, slots=True)
class Header:
    """What the classification of a file needs from its DICOM header.

    Text values are ASCII with trailing DICOM padding (spaces, NULs) removed and leading
    spaces kept, as Orthanc reads them; absent elements read as "". ``pixel`` is (VR or
    None when implicit, value length, offset of the pixel data element in the file), or
    None when the file has no pixel data. ``study_date``, ``accession``, ``modality`` and
    ``modalities_in_study`` are what a selection of studies looks at.
    """

    sop_class: str
    transfer_syntax: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    rows_and_columns: bool
    pixel: tuple[str | None, int, int] | None
    study_date: str = ""
    accession: str = ""
    modality: str = ""
    modalities_in_study: str = ""


def read_header(data: bytes | memoryview, size: int | None = None) -> Header:
    """Read the header of a Part-10 file held in ``data`` (bytes, or an mmap's view).

    ``size`` is the number of valid bytes (``len(data)`` when None). Raises
    :class:`Unsupported` for anything pydicom should handle instead.
    """
    end = len(data) if size is None else size
    if end < 132 or data[128:132] != b"DICM":
        raise Unsupported("no Part-10 preamble")
    meta: dict[int, bytes] = {}
    pos = 132
    # File meta information: always explicit VR little endian, group 0002.
    while pos + 8 <= end:
        group, _ = _TAG.unpack_from(data, pos)
        if group != 0x0002:
            break
        tag, vr, length, header = _element(data, pos, end, explicit=True)
        if length == _UNDEFINED or pos + header + length > end:
            raise Unsupported("malformed file meta information")
        if tag in (_SOP_CLASS, _TRANSFER_SYNTAX):
            meta[tag] = bytes(data[pos + header : pos + header + length])
        pos += header + length
    syntax = _text(meta.get(_TRANSFER_SYNTAX, b""), uid=True)
    if not syntax or syntax in _UNSUPPORTED_SYNTAXES:
        raise Unsupported(f"transfer syntax {syntax or 'missing'}")
    explicit = syntax != IMPLICIT_VR_LE

    values: dict[int, bytes] = {}
    pixel: tuple[str | None, int, int] | None = None
    tag_at, u16_at, u32_at = _TAG.unpack_from, _U16.unpack_from, _U32.unpack_from
    while pos < end:
        # The common case inline (a function call per element doubled the cost).
        if pos + 12 > end:
            tag, vr, length, header = _element(data, pos, end, explicit)
        else:
            group, element = tag_at(data, pos)
            tag = group << 16 | element
            vr = data[pos + 4 : pos + 6] if explicit and group != 0xFFFE else None
            if vr is None:
                length, header = u32_at(data, pos + 4)[0], 8
            elif vr in _SHORT_VRS:
                length, header = u16_at(data, pos + 6)[0], 8
            elif vr in _LONG_VRS:
                length, header = u32_at(data, pos + 8)[0], 12
            else:
                raise Unsupported("not explicit VR")
        if tag in PIXEL_TAGS:
            pixel = (vr.decode() if vr else None, length, pos)
            break
        start = pos + header
        if length == _UNDEFINED:
            # A sequence, or an encapsulated value: items up to the sequence delimiter.
            # UN of undefined length holds implicit VR items (DICOM CP-246).
            pos = _skip_items(data, start, end, explicit and vr != b"UN", 1)
            continue
        if start + length > end:
            raise Unsupported("element runs past the end of the file")
        if tag in _WANTED:
            values[tag] = bytes(data[start : start + length])
        pos = start + length
    return Header(
        sop_class=_text(meta.get(_SOP_CLASS, b""), uid=True),
        transfer_syntax=syntax,
        patient_id=_text(values.get(_PATIENT_ID, b"")),
        study_uid=_text(values.get(_STUDY, b""), uid=True),
        series_uid=_text(values.get(_SERIES, b""), uid=True),
        sop_uid=_text(values.get(_SOP_INSTANCE, b""), uid=True),
        rows_and_columns=_ROWS in values and _COLUMNS in values,
        pixel=pixel,
        study_date=_text(values.get(_STUDY_DATE, b"")),
        accession=_text(values.get(_ACCESSION, b"")),
        modality=_text(values.get(_MODALITY, b"")),
        modalities_in_study=_text(values.get(_MODALITIES, b"")),
    )


def element_header_size(vr: str | None) -> int:
    """Bytes before the value of an element with this VR (None: implicit VR)."""
    return 12 if vr is not None and vr.encode() in _LONG_VRS else 8


def _element(
    data: bytes | memoryview, pos: int, end: int, explicit: bool
) -> tuple[int, bytes | None, int, int]:
    """(tag, VR, value length, header length) of the element starting at ``pos``."""
    if pos + 8 > end:
        raise Unsupported("truncated element header")
    group, element = _TAG.unpack_from(data, pos)
    tag = group << 16 | element
    if not explicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(data, pos + 4)[0], 8
    vr = bytes(data[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > end:
            raise Unsupported("truncated element header")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], 12
    if vr in _SHORT_VRS:
        return tag, vr, _U16.unpack_from(data, pos + 6)[0], 8
    raise Unsupported("not explicit VR")


def _skip_items(data: bytes | memoryview, pos: int, end: int, explicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length value; return the offset after it."""
    if depth > _MAX_DEPTH:
        raise Unsupported("sequences nested too deep")
    while True:
        if pos + 8 > end:
            raise Unsupported("sequence runs past the end of the file")
        group, element = _TAG.unpack_from(data, pos)
        (length,) = _U32.unpack_from(data, pos + 4)
        pos += 8
        if group != 0xFFFE:
            raise Unsupported("malformed sequence")
        if element == _SEQUENCE_END:
            return pos
        if element != _ITEM:
            raise Unsupported("malformed sequence item")
        if length != _UNDEFINED:
            pos += length
            continue
        # An item of undefined length: a nested dataset up to its item delimiter.
        while True:
            tag, vr, length, header = _element(data, pos, end, explicit)
            if tag == 0xFFFE0000 | _ITEM_END:
                pos += 8
                break
            pos += header
            if length == _UNDEFINED:
                pos = _skip_items(data, pos, end, explicit and vr != b"UN", depth + 1)
            else:
                pos += length


def _text(raw: bytes, uid: bool = False) -> str:
    # Multi-valued ASCII text is kept whole, backslashes and inner padding included, and
    # its padding removed as Orthanc does (see orthanc_bytes); an escape sequence
    # (ISO 2022) is left to pydicom.
    if b"\x1b" in raw:
        raise Unsupported("escaped text")
    try:
        return orthanc_bytes(raw, uid=uid).decode("ascii")
    except UnicodeDecodeError:
        raise Unsupported("non-ASCII text") from None
