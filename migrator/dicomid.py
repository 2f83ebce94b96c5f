"""Orthanc resource identifiers computed locally from DICOM tags.

Orthanc names every instance with the SHA-1 of
``PatientID|StudyInstanceUID|SeriesInstanceUID|SOPInstanceUID`` written as five
dash-separated groups of eight hex digits. Computing it locally lets a migration know the
target-side ID of a file before (or without) uploading it.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["format_sha1", "orthanc_id_from_dataset", "orthanc_instance_id"]


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


def _tag_text(ds: Any, keyword: str) -> str:
    value = getattr(ds, keyword, None)
    if value is None:
        return ""
    # Orthanc hashes values with trailing space/NUL padding removed but leading spaces
    # kept (checked on 1.10.1: PatientID " P X " hashes as " P X").
    return str(value).rstrip(" \x00")


def orthanc_id_from_dataset(ds: Any) -> str:
    """Return the Orthanc instance ID of a pydicom ``Dataset``.

    A missing PatientID counts as the empty string, as it does in Orthanc. Raises
    ``ValueError`` when one of the three UIDs is missing or empty, because Orthanc rejects
    such a file instead of storing it.
    """
    patient_id = _tag_text(ds, "PatientID")
    uids = [_tag_text(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if not all(uids):
        raise ValueError("dataset lacks StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
    return orthanc_instance_id(patient_id, *uids)
