"""Reading DICOM headers with pydicom, for the files the fast reader declines.

:func:`pydicom_header` parses up to the pixel data, with or without preamble and file
meta information. What it finds without all three identifiers is read harder before the
classification gives up on it: past the pixel data and in each encoding
(:func:`out_of_order_header`, a dataset written out of order), or inflated
(:func:`inflated_header`, a deflated dataset without the file meta that would say so).
"""

from __future__ import annotations

import io
import mmap
import warnings
import zlib
from dataclasses import replace
from typing import Any

from migrator.ends.dicomid import tag_text
from migrator.ends.folder.dicomhead import PIXEL_TAGS, Header

__all__ = [
    "DEFLATED_TS",
    "UNDEFINED_LENGTH",
    "all_uids",
    "has_uids",
    "inflated_header",
    "inflated_start",
    "out_of_order_header",
    "pydicom_header",
]

DEFLATED_TS = "1.2.840.10008.1.2.1.99"
UNDEFINED_LENGTH = 0xFFFFFFFF
# Values above this are read lazily by pydicom; keeps big private blobs out of memory.
_DEFER_SIZE = 64 * 1024
# A deflated dataset without file meta information: the identifiers are in the first
# inflated kilobytes.
_INFLATE_INPUT = 64 * 1024
_INFLATE_OUTPUT = 256 * 1024


def has_uids(header: Header) -> bool:
    """Whether any of the three UIDs was found."""
    return bool(header.study_uid or header.series_uid or header.sop_uid)


def all_uids(header: Header) -> bool:
    """Whether all three UIDs were found."""
    return bool(header.study_uid and header.series_uid and header.sop_uid)


def inflated_start(data: bytes | mmap.mmap) -> bytes:
    """The first bytes ``data`` inflates to as a raw deflate stream (b"" if it does not)."""
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(data[:4096]), 16)
    except zlib.error:
        return b""


def inflated_header(data: bytes | mmap.mmap) -> Header | None:
    """The header of a deflated dataset written without file meta information, or None
    when the file does not inflate into one. Only the beginning is inflated: enough for
    the identifiers, not for the pixel data (whose presence stays unknown)."""
    engine = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        plain = engine.decompress(bytes(data[:_INFLATE_INPUT]), _INFLATE_OUTPUT)
    except zlib.error:
        return None
    if len(plain) < 8:
        return None
    try:
        header = pydicom_header(plain, force=True)
    except Exception:  # not a dataset after all
        return None
    if not has_uids(header):
        return None
    return replace(header, transfer_syntax=DEFLATED_TS, pixel=None)


def out_of_order_header(data: bytes | mmap.mmap, first: Header, part10: bool) -> Header:
    """Read ``data`` past its pixel data, and a dataset without preamble in each encoding,
    until the identifiers are found; ``first`` when they are not."""
    attempts: list[tuple[bool, bool] | None] = [None] if first.pixel is not None else []
    if not part10:
        attempts += [(True, True), (False, True), (False, False)]
    for encoding in attempts:
        try:
            if encoding is None:
                header = pydicom_header(data, force=True, whole=True)
            else:
                header = _raw_header(data, *encoding)
        except Exception:  # pydicom raises many types on what is not this encoding
            continue
        if all_uids(header):
            return header
    return first


def _raw_header(data: bytes | mmap.mmap, implicit: bool, little: bool) -> Header:
    """Read ``data`` whole as a dataset without preamble nor file meta information."""
    from pydicom.filereader import read_dataset  # only odd files need it

    fh = io.BytesIO(data) if isinstance(data, bytes) else data
    fh.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(fh, implicit, little, defer_size=_DEFER_SIZE)
    pixels = any(tag in ds for tag in PIXEL_TAGS)
    return _header(ds, None, (None, UNDEFINED_LENGTH, 0) if pixels else None)


def pydicom_header(data: bytes | mmap.mmap, force: bool, whole: bool = False) -> Header:
    """Parse up to the pixel data with pydicom, for files :func:`read_header` declines.

    ``whole`` reads past the pixel data too (values are read lazily): a dataset written
    out of order may have its identifiers after it. Where its pixel data lies and whether
    they are complete is then not measured.
    """
    from pydicom.filereader import read_partial  # only odd files need it

    seen: list[tuple[str | None, int]] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_TAGS:
            seen.append((vr, length))
            return not whole
        return False

    fh = io.BytesIO(data) if isinstance(data, bytes) else data
    fh.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_partial(fh, stop_when=at_pixels, defer_size=_DEFER_SIZE, force=force)
    # read_partial rewinds to the start of the pixel element before returning; a whole
    # read gives the pixel data an undefined length, which _truncation does not measure.
    pixel = None
    if seen:
        vr, length = seen[-1]
        pixel = (vr, UNDEFINED_LENGTH, 0) if whole else (vr, length, fh.tell())
    return _header(ds, getattr(ds, "file_meta", None), pixel)


def _header(ds: Any, meta: Any, pixel: tuple[str | None, int, int] | None) -> Header:
    """A Header from a dataset pydicom read (values raw, as Orthanc hashes them)."""
    return Header(
        sop_class=str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else "",
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        patient_id=tag_text(ds, "PatientID"),
        study_uid=tag_text(ds, "StudyInstanceUID"),
        series_uid=tag_text(ds, "SeriesInstanceUID"),
        sop_uid=tag_text(ds, "SOPInstanceUID"),
        rows_and_columns="Rows" in ds and "Columns" in ds,
        pixel=pixel,
        study_date=tag_text(ds, "StudyDate"),
        accession=tag_text(ds, "AccessionNumber"),
        modality=tag_text(ds, "Modality"),
        modalities_in_study=tag_text(ds, "ModalitiesInStudy"),
    )
