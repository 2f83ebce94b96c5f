"""Orthanc resource identifiers computed locally from DICOM tags.

Orthanc names every instance with the SHA-1 of
``PatientID|StudyInstanceUID|SeriesInstanceUID|SOPInstanceUID`` written as five
dash-separated groups of eight hex digits. Computing it locally lets a migration know the
target-side ID of a file before (or without) uploading it.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

__all__ = [
    "format_sha1",
    "orthanc_bytes",
    "orthanc_id_from_dataset",
    "orthanc_instance_id",
    "tag_text",
]


def format_sha1(text: str) -> str:
    """Return the SHA-1 of ``text`` (UTF-8) in Orthanc's ``xxxxxxxx-...`` layout."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def orthanc_instance_id(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Return the Orthanc ID of the instance identified by these four tag values.

    Values must already be in the form Orthanc sees them, i.e. without DICOM padding;
    :func:`orthanc_id_from_dataset` takes care of that for a parsed dataset.
    """
    return format_sha1(f"{patient_id}|{study_uid}|{series_uid}|{sop_uid}")


def orthanc_bytes(raw: bytes, *, uid: bool) -> bytes:
    """Return a raw text value as Orthanc 1.10.1 hashes it (DCMTK's reading of it).

    Checked value by value against Orthanc: a UID loses every space, wherever it is, and
    ends at its first NUL. Any other text is cut at its first NUL, and loses its trailing
    spaces only when its length is even: DCMTK pads an odd-length value with a NUL before
    removing the padding, so ``"AB "`` stays ``"AB "`` while ``"AB  "`` becomes ``"AB"``.
    Leading spaces and the backslashes and padding between values stay.
    """
    if uid:
        return raw.split(b"\0", 1)[0].replace(b" ", b"")
    if len(raw) % 2 == 0:
        raw = raw.rstrip(b" ")
    return raw.split(b"\0", 1)[0]


def tag_text(ds: Any, keyword: str) -> str:
    """Return the value of ``keyword`` in a pydicom ``Dataset`` as Orthanc hashes it.

    Orthanc takes the stored value whole, with the backslashes between the values of a
    multi-valued element, and removes padding as :func:`orthanc_bytes` says (checked on
    1.10.1: PatientID ``A \\B  `` hashes as ``A \\B``, `` P X `` as `` P X``). pydicom's
    view of such a value is a list of values with each one's padding removed, so the raw
    bytes are used while the element is still unparsed (as after ``dcmread``/
    ``read_partial``); a parsed element's values are joined with backslashes.
    An absent or unreadable element is "".
    """
    # Imported here: pydicom costs ~0.1 s to import, and most commands never read a file.
    from pydicom.datadict import tag_for_keyword
    from pydicom.multival import MultiValue

    try:
        elem = ds.get_item(tag_for_keyword(keyword))
    except Exception:  # a malformed element must not hide the rest of the header
        return ""
    value = None if elem is None else elem.value
    if value is None:
        return ""
    uid = keyword.endswith("UID")
    if isinstance(value, bytes | bytearray):
        return _decode(orthanc_bytes(bytes(value), uid=uid), ds)
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    if uid:
        return text.split("\0", 1)[0].replace(" ", "")
    return text.rstrip(" \x00")


def _decode(raw: bytes, ds: Any) -> str:
    """Decode a raw text value with the dataset's character set, value by value (as
    pydicom does: an ISO 2022 escape does not outlive a backslash)."""
    from pydicom.charset import convert_encodings, decode_bytes

    try:
        raw_charset = ds.get_item(0x00080005)
        charset = raw_charset.value if raw_charset is not None else None
        if isinstance(charset, bytes):
            names = [v.decode("ascii", "replace").strip() for v in charset.split(b"\\")]
            encodings = convert_encodings(names)
        else:
            encodings = convert_encodings(charset or None)
    except Exception:  # an unknown character set: decode as the default repertoire
        encodings = ["iso8859"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return "\\".join(decode_bytes(v, encodings, set()) for v in raw.split(b"\\"))


def orthanc_id_from_dataset(ds: Any) -> str:
    """Return the Orthanc instance ID of a pydicom ``Dataset``.

    A missing PatientID counts as the empty string, as it does in Orthanc. Raises
    ``ValueError`` when one of the three UIDs is missing or empty, because Orthanc rejects
    such a file instead of storing it.
    """
    patient_id = tag_text(ds, "PatientID")
    uids = [tag_text(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if not all(uids):
        raise ValueError("dataset lacks StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
    return orthanc_instance_id(patient_id, *uids)
