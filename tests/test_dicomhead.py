"""The fast header reader agrees with pydicom, and declines what it does not handle."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from migrator.ends.folder.dicomhead import Unsupported, read_header
from migrator.ends.folder.fileclass import _pydicom_header, classify_file
from migrator.testkit.dicomgen import make_instance


def _dataset(syntax: str, patient_id: str = "P1", *, pixels: bool = True) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    if pixels:
        ds.PixelData = b"\x01\x00" * 4
    return ds


def _write(ds: Dataset, *, implicit_vr: bool | None = None) -> bytes:
    buf = io.BytesIO()
    if implicit_vr is None:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        ds.save_as(buf, implicit_vr=implicit_vr, little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def _nested() -> Dataset:
    # Undefined-length sequences nested two deep, with undefined-length items.
    inner = Dataset()
    inner.CodeValue = "X"
    inner.CodeMeaning = "inner"
    outer = Dataset()
    outer.ConceptNameCodeSequence = Sequence([inner])
    outer.TextValue = "outer"
    ds = _dataset(ExplicitVRLittleEndian)
    ds.ContentSequence = Sequence([outer, Dataset()])
    for parent, keyword in ((ds, "ContentSequence"), (outer, "ConceptNameCodeSequence")):
        parent[keyword].is_undefined_length = True
        for item in parent[keyword].value:
            item.is_undefined_length_sequence_item = True
    return ds


def _encapsulated() -> Dataset:
    ds = _dataset(JPEGBaseline8Bit, pixels=False)
    ds.PixelData = encapsulate([b"\xff\xd8fragment-one\xff\xd9", b"\xff\xd8two\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    icon = Dataset()
    icon.Rows = 1
    icon.Columns = 1
    icon.BitsAllocated = 16
    icon.PixelData = b"\x00\x00"
    ds.IconImageSequence = Sequence([icon])
    return ds


FAST_CASES = {
    "testkit file": lambda: make_instance("P", "1.2.3", "1.2.3.4", "1.2.3.4.5", seed=1),
    "with private OB": lambda: make_instance("P", "1.2", "1.2.3", "1.2.3.4", extra_bytes=70000),
    "implicit VR": lambda: _write(_dataset(ImplicitVRLittleEndian), implicit_vr=True),
    "nested sequences": lambda: _write(_nested()),
    "encapsulated pixels": lambda: _write(_encapsulated()),
    "header only": lambda: _write(_dataset(ExplicitVRLittleEndian, pixels=False)),
    "padded patient id": lambda: _write(_dataset(ExplicitVRLittleEndian, " P X ")),
}


@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_fast_reader_matches_pydicom(case: str) -> None:
    data = FAST_CASES[case]()
    fast = read_header(data)
    assert fast == _pydicom_header(data, force=False)
    assert fast.study_uid and fast.series_uid and fast.sop_uid


def test_fast_reader_reports_pixels_and_truncation(tmp_path) -> None:
    data = make_instance("P", "1.2.3", "1.2.3.4", "1.2.3.4.5", rows=8, cols=8)
    header = read_header(data)
    assert header.pixel is not None
    vr, length, offset = header.pixel
    assert (vr, length) == ("OW", 8 * 8 * 2)
    assert offset + 12 + length == len(data)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-10])
    cand = classify_file(str(cut))
    assert cand.problem == f"truncated DICOM: pixel data has {length - 10} of {length} bytes"
    assert cand.skip_reason is None


def _big_endian() -> bytes:
    ds = _dataset(ExplicitVRBigEndian)
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=False, enforce_file_format=True)
    return buf.getvalue()


DECLINED = {
    "big endian": _big_endian,
    "deflated": lambda: _write(_dataset(DeflatedExplicitVRLittleEndian)),
    "no preamble": lambda: _write(_dataset(ExplicitVRLittleEndian))[128 + 4 :],
    "cut in the header": lambda: make_instance("P", "1.2.3", "1.2.3.4", "1.2.3.4.5")[:300],
    "non-ASCII patient id": lambda: _write(_dataset(ExplicitVRLittleEndian, "PAT\xe9")),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_fast_reader_declines_what_pydicom_must_read(case: str, tmp_path) -> None:
    data = DECLINED[case]()
    with pytest.raises(Unsupported):
        read_header(data)
    # The classification still works, through pydicom.
    path = tmp_path / "f.dcm"
    path.write_bytes(data)
    cand = classify_file(str(path))
    if case in ("big endian", "deflated", "non-ASCII patient id", "no preamble"):
        assert cand.skip_reason is None
        assert cand.sop_uid == "1.2.3.4.5"
    else:
        # Cut before its identifiers: only the target can tell (it is offered).
        assert cand.skip_reason is None and cand.orthanc_id is None
        assert cand.undecided == "no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID found"


def test_big_file_is_mapped_not_read(tmp_path) -> None:
    data = make_instance("P", "1.2.3", "1.2.3.4", "1.2.3.4.5", extra_bytes=3 << 20)
    path = tmp_path / "big.dcm"
    path.write_bytes(data)
    cand = classify_file(str(path))
    assert cand.skip_reason is None and cand.problem is None
    assert cand.size == len(data) and cand.has_pixels


def test_orthanc_id_of_a_padded_patient_id_is_orthancs(tmp_path, orthanc_factory) -> None:
    # Orthanc keeps leading spaces of PatientID and drops trailing ones; the ID computed
    # for a file before sending must be the one the target gives it.
    data = make_instance(" P X ", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    path = tmp_path / "padded.dcm"
    path.write_bytes(data)
    cand = classify_file(str(path))
    assert read_header(data).patient_id == " P X"
    stored = orthanc_factory("padded").upload(data)
    assert cand.orthanc_id == stored["ID"]
