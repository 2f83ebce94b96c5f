"""DICOM files encoded by hand, in any transfer syntax and framing, with oddities.

pydicom writes well-formed files only; the classification of a folder must also cope with
what old modalities and hand-rolled tools wrote: datasets without the 128-byte preamble and
without file meta information, big endian, deflated, odd value lengths, private sequences,
missing elements, elements out of order, trailing padding, truncation anywhere.
:func:`build_folder` writes a folder of such files and says what each one is.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from migrator.ends.dicomid import orthanc_instance_id

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
SYNTAX_NAMES = {
    IMPLICIT_LE: "implicit-le",
    EXPLICIT_LE: "explicit-le",
    EXPLICIT_BE: "explicit-be",
    DEFLATED: "deflated",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UID_ROOT = "1.2.826.0.1.3680043.10.77"
# Explicit-VR elements with a 4-byte length.
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_UNDEFINED = 0xFFFFFFFF

# (tag, VR, value): value is bytes, or for SQ a list of items (lists of elements).
Element = tuple[int, str, "bytes | list[list[Element]]"]


def encode(
    elements: list[Element], *, explicit: bool, little: bool, undefined: bool = False
) -> bytes:
    """Encode elements in order; sequences and items of undefined length if ``undefined``."""
    return b"".join(_element(e, explicit, little, undefined) for e in elements)


def _element(element: Element, explicit: bool, little: bool, undefined: bool) -> bytes:
    tag, vr, value = element
    order = "<" if little else ">"
    if vr == "SQ":
        assert isinstance(value, list)
        body = b""
        for item in value:
            inner = encode(item, explicit=explicit, little=little, undefined=undefined)
            if undefined:
                body += struct.pack(order + "HHI", 0xFFFE, 0xE000, _UNDEFINED) + inner
                body += struct.pack(order + "HHI", 0xFFFE, 0xE00D, 0)
            else:
                body += struct.pack(order + "HHI", 0xFFFE, 0xE000, len(inner)) + inner
        if undefined:
            body += struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0)
        raw, length = body, _UNDEFINED if undefined else len(body)
    else:
        assert isinstance(value, bytes)
        raw, length = value, len(value)
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack(order + "I", length) + raw
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(order + "I", length) + raw
    return head + vr.encode() + struct.pack(order + "H", length) + raw


def text(value: str, vr: str = "LO", *, pad: bool = True, charset: str = "ascii") -> bytes:
    """A text value, padded to an even length as DICOM wants unless ``pad`` is False."""
    raw = value.encode(charset)
    if pad and len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _us(value: int, little: bool) -> bytes:
    return struct.pack("<H" if little else ">H", value)


@dataclass
class Spec:
    """The identifiers and elements of one generated instance."""

    patient_id: str
    study: str
    series: str
    sop: str
    elements: list[Element]

    @property
    def orthanc_id(self) -> str:
        """The ID Orthanc gives it (identifiers as Orthanc reads them)."""
        return orthanc_instance_id(self.patient_id, self.study, self.series, self.sop)


def instance(n: int, little: bool = True, *, pad: bool = True) -> Spec:
    """A small 8-bit image numbered ``n``; with ``pad`` False its UIDs and name have odd
    lengths, written without padding."""
    study = f"{UID_ROOT}.{n}"
    if not pad and len(study) % 2 == 0:
        study += "1"
    series, sop = f"{study}.1", f"{study}.1.1"
    patient = f"FORGE-{n}"
    if not pad:
        # Odd length, ending with a space that is data, not padding: Orthanc keeps it.
        patient += "X " if len(patient) % 2 else " "
    elements: list[Element] = [
        (0x00080005, "CS", text("ISO_IR 100")),
        (0x00080016, "UI", text(SECONDARY_CAPTURE, "UI")),
        (0x00080018, "UI", text(sop, "UI", pad=pad)),
        (0x00080060, "CS", text("OT")),
        (0x00100010, "PN", text(f"FORGE^{n}X" if len(str(n)) % 2 else f"FORGE^{n}", pad=pad)),
        (0x00100020, "LO", text(patient, pad=pad)),
        (0x0020000D, "UI", text(study, "UI", pad=pad)),
        (0x0020000E, "UI", text(series, "UI", pad=pad)),
        (0x00200013, "IS", text("1")),
        (0x00280002, "US", _us(1, little)),
        (0x00280004, "CS", text("MONOCHROME2")),
        (0x00280010, "US", _us(4, little)),
        (0x00280011, "US", _us(4, little)),
        (0x00280100, "US", _us(8, little)),
        (0x00280101, "US", _us(8, little)),
        (0x00280102, "US", _us(7, little)),
        (0x00280103, "US", _us(0, little)),
        (0x7FE00010, "OB", bytes((n + i) % 256 for i in range(16))),
    ]
    return Spec(patient, study, series, sop, elements)


def file_meta(syntax: str, sop: str) -> bytes:
    """File meta information (group 0002, always explicit VR little endian)."""
    body = encode(
        [
            (0x00020001, "OB", b"\0\1"),
            (0x00020002, "UI", text(SECONDARY_CAPTURE, "UI")),
            (0x00020003, "UI", text(sop, "UI")),
            (0x00020010, "UI", text(syntax, "UI")),
            (0x00020012, "UI", text(f"{UID_ROOT}.0", "UI")),
        ],
        explicit=True,
        little=True,
    )
    length = encode([(0x00020000, "UL", struct.pack("<I", len(body)))], explicit=True, little=True)
    return length + body


def encode_file(
    elements: list[Element], syntax: str, framing: str, sop: str, *, undefined: bool = False
) -> bytes:
    """The bytes of a file: ``framing`` is "part10" (preamble, DICM, file meta), "meta"
    (file meta at offset 0, no preamble) or "raw" (the dataset alone)."""
    little = syntax != EXPLICIT_BE
    body = encode(elements, explicit=syntax != IMPLICIT_LE, little=little, undefined=undefined)
    if syntax == DEFLATED:
        engine = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = engine.compress(body) + engine.flush()
    if framing == "raw":
        return body
    meta = file_meta(syntax, sop)
    return meta + body if framing == "meta" else b"\0" * 128 + b"DICM" + meta + body


# --- oddities: each turns the spec of an instance into another ---------------------------


def _without(*tags: int) -> Callable[[Spec, bool], Spec]:
    def change(spec: Spec, little: bool) -> Spec:
        spec.elements = [e for e in spec.elements if e[0] not in tags]
        if 0x00100020 in tags:
            spec.patient_id = ""
        return spec

    return change


def _private_sequences(spec: Spec, little: bool) -> Spec:
    inner: list[Element] = [(0x00090010, "LO", text("FORGE INNER")), (0x00091002, "LO", b"x ")]
    nested: Element = (0x00091003, "SQ", [inner, []])
    spec.elements += [
        (0x00090010, "LO", text("FORGE PRIVATE")),
        (0x00091001, "SQ", [[*inner, nested], [(0x00091002, "LO", b"yz")]]),
        (0x00110010, "LO", text("FORGE OTHER")),
        (0x00111001, "UN", b"\x01\x02\x03"),  # odd length, unknown content
    ]
    spec.elements.sort(key=lambda e: e[0])
    return spec


def _multi_valued_id(spec: Spec, little: bool) -> Spec:
    # Orthanc hashes the value whole, backslash and inner padding included.
    raw = b" P \\Q2  "
    spec.patient_id = " P \\Q2"
    spec.elements = [(t, v, raw if t == 0x00100020 else x) for t, v, x in spec.elements]
    return spec


def _latin1_id(spec: Spec, little: bool) -> Spec:
    raw = text("M\u00fcller-" + spec.sop[-6:], charset="latin-1")
    spec.patient_id = raw.decode("latin-1").rstrip()
    spec.elements = [(t, v, raw if t == 0x00100020 else x) for t, v, x in spec.elements]
    return spec


def _group_lengths(spec: Spec, little: bool) -> Spec:
    groups: dict[int, list[Element]] = {}
    for e in spec.elements:
        groups.setdefault(e[0] >> 16, []).append(e)
    out: list[Element] = []
    for group, members in groups.items():
        # Explicit and implicit encodings of these elements have the same length here
        # (no element with a 4-byte explicit length apart from pixel data, left alone).
        size = len(encode(members, explicit=True, little=little))
        if group != 0x7FE0:
            out.append((group << 16, "UL", struct.pack("<I" if little else ">I", size)))
        out += members
    spec.elements = out
    return spec


def _trailing_padding(spec: Spec, little: bool) -> Spec:
    spec.elements.append((0xFFFCFFFC, "OB", b"\0" * 64))
    return spec


def _out_of_order(spec: Spec, little: bool) -> Spec:
    # Pixel data first, identifiers last: the target's reader does not mind.
    spec.elements.reverse()
    return spec


def _no_pixels(spec: Spec, little: bool) -> Spec:
    spec.elements = [e for e in spec.elements if e[0] != 0x7FE00010]
    return spec


ODDITIES: dict[str, Callable[[Spec, bool], Spec]] = {
    "odd-lengths": lambda spec, little: spec,  # made by instance(pad=False)
    "private-sequences": _private_sequences,
    "no-type1": _without(0x00080016, 0x00080060, 0x00280004),
    "no-patient-id": _without(0x00100020),
    "multi-valued-id": _multi_valued_id,
    "latin1-id": _latin1_id,
    "group-lengths": _group_lengths,
    "trailing-padding": _trailing_padding,
    "out-of-order": _out_of_order,
    "no-pixels": _no_pixels,
    "no-sop-uid": _without(0x00080018),
    "no-study-uid": _without(0x0020000D),
    "no-series-uid": _without(0x0020000E),
}
# Oddities after which the target cannot store the instance.
NOT_STORABLE = {"no-sop-uid", "no-study-uid", "no-series-uid"}


@dataclass
class Made:
    """One file of the folder: what it is and, for DICOM, the ID Orthanc gives it."""

    name: str
    kind: str
    orthanc_id: str | None


def build_folder(root: Path) -> list[Made]:
    """Write the test folder under ``root``; return what each file is.

    Kinds: "dicom" (complete, any encoding and framing), "odd:<oddity>", "truncated",
    "deflated-raw" (deflated without file meta: the target cannot read it), "other" (not
    DICOM, positively), "unreadable" (DICOM that pydicom cannot read and the target can),
    "garbage" (what no reader parses).
    """
    made: list[Made] = []
    n = 0

    def write(name: str, data: bytes, kind: str, orthanc_id: str | None) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        made.append(Made(name, kind, orthanc_id))

    syntaxes = (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED)
    for syntax in syntaxes:
        for framing in ("part10", "meta", "raw"):
            for undefined in (False, True):
                n += 1
                spec = _private_sequences(instance(n, syntax != EXPLICIT_BE), True)
                data = encode_file(spec.elements, syntax, framing, spec.sop, undefined=undefined)
                kind = "deflated-raw" if syntax == DEFLATED and framing == "raw" else "dicom"
                name = f"plain/{SYNTAX_NAMES[syntax]}-{framing}-{'undef' if undefined else 'def'}"
                write(name, data, kind, spec.orthanc_id)
    for oddity, change in ODDITIES.items():
        for syntax in syntaxes[:3]:
            little = syntax != EXPLICIT_BE
            for framing in ("part10", "raw"):
                n += 1
                spec = change(instance(n, little, pad=oddity != "odd-lengths"), little)
                data = encode_file(spec.elements, syntax, framing, spec.sop)
                write(
                    f"odd/{oddity}/{SYNTAX_NAMES[syntax]}-{framing}",
                    data,
                    f"odd:{oddity}",
                    spec.orthanc_id,
                )
    n = _truncations(write, n)
    _others(write)
    return made


def _truncations(write: Callable[[str, bytes, str, str | None], None], n: int) -> int:
    """Each encoding cut at every element boundary, and three bytes before it."""
    for syntax, framing in (
        (IMPLICIT_LE, "raw"),
        (EXPLICIT_LE, "raw"),
        (EXPLICIT_BE, "raw"),
        (EXPLICIT_LE, "part10"),
        (IMPLICIT_LE, "part10"),
    ):
        little = syntax != EXPLICIT_BE
        count = len(instance(0, little).elements)
        for index in range(1, count + 1):
            for back in (0, 3):
                n += 1
                spec = instance(n, little)
                full = encode_file(spec.elements, syntax, framing, spec.sop)
                tail = encode(spec.elements[index:], explicit=syntax != IMPLICIT_LE, little=little)
                cut = len(full) - len(tail) - back
                if cut >= len(full):
                    continue
                name = f"cut/{SYNTAX_NAMES[syntax]}-{framing}-{index:02d}-{back}"
                write(name, full[:cut], "truncated", spec.orthanc_id)
    return n


def _others(write: Callable[[str, bytes, str, str | None], None]) -> None:
    rng = random.Random(15)
    write("other/picture.png", b"\x89PNG\r\n\x1a\n" + rng.randbytes(200), "other", None)
    write("other/photo.jpg", b"\xff\xd8\xff\xe0" + rng.randbytes(200), "other", None)
    write("other/report.pdf", b"%PDF-1.4\n" + rng.randbytes(200), "other", None)
    write("other/notes.txt", "Notizen zur Studie: Müller\n".encode() * 3, "other", None)
    write("other/summary.json", b'{"0010,0010": {"Name": "PatientName"}}', "other", None)
    write("other/list.json", b"[1, 2, 3]\n", "other", None)
    write("other/empty", b"", "other", None)
    write("other/noise.bin", rng.randbytes(4000), "other", None)
    # An element with a VR in lower case: pydicom loses its way after it, the target's
    # reader (DCMTK) does not.
    for n, framing in ((900, "raw"), (901, "part10")):
        spec = instance(n)
        spec.elements.append((0x00090010, "lo", text("FORGE PRIVATE")))
        spec.elements.sort(key=lambda e: e[0])
        data = encode_file(spec.elements, EXPLICIT_LE, framing, spec.sop)
        write(f"other/lowercase-vr-{framing}", data, "unreadable", spec.orthanc_id)
    # A dataset whose private sequence turns into noise: no reader gets through it.
    spec = instance(0)
    head = encode(spec.elements[:3], explicit=True, little=True)
    sequence = b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    write("other/broken-sequence", head + sequence + bytes(range(1, 9)) * 4, "garbage", None)
