"""Synthetic DICOM files for tests, demos and benchmarks.

Files are small Secondary Capture images with deterministic UIDs and pixel data, so a
test can compute every Orthanc ID locally and compare stored bytes exactly.
"""

from __future__ import annotations

import io
import math
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from migrator.ends.dicomid import orthanc_instance_id

if TYPE_CHECKING:
    from migrator.testkit.orthanc import OrthancProcess

__all__ = [
    "SECONDARY_CAPTURE",
    "UID_ROOT",
    "SyntheticInstance",
    "iter_dataset",
    "make_dataset",
    "make_instance",
    "orthanc_instance_id",
    "upload_all",
]

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# pydicom's registered root; fine for synthetic data that never leaves a test.
UID_ROOT = "1.2.826.0.1.3680043.8.498."
_PRIVATE_CREATOR = "MIGRATOR TESTKIT"
_INSTANCES_PER_SERIES = 10
_STUDIES_PER_PATIENT = 2


@dataclass(frozen=True, slots=True)
class SyntheticInstance:
    """One generated DICOM file and the identifiers it carries."""

    orthanc_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Slot:
    """The identifiers of the i-th instance of a generated dataset (numbers from 1)."""

    index: int
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: int
    instance_number: int

    @property
    def ids(self) -> tuple[str, str, str, str]:
        """PatientID and the study, series and SOP instance UIDs, in that order."""
        return (self.patient_id, self.study_uid, self.series_uid, self.sop_uid)

    def instance(self, data: bytes) -> SyntheticInstance:
        """The generated file for this slot."""
        return SyntheticInstance(
            orthanc_id=orthanc_instance_id(*self.ids),
            patient_id=self.patient_id,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            sop_uid=self.sop_uid,
            data=data,
        )


def iter_slots(
    n_instances: int, *, patient_prefix: str, uid_root: str, per_series: int, series_per_study: int
) -> Iterator[Slot]:
    """The identifiers of `n_instances` instances: `per_series` per series,
    `series_per_study` series per study, two studies per patient. UIDs are
    ``{uid_root}.study.series.instance``, patient IDs ``{patient_prefix}-000001``."""
    per_study = per_series * series_per_study
    for i in range(n_instances):
        study_no, rest = divmod(i, per_study)
        series_no, inst_no = divmod(rest, per_series)
        study_uid = f"{uid_root}.{study_no + 1}"
        series_uid = f"{study_uid}.{series_no + 1}"
        yield Slot(
            index=i,
            patient_id=f"{patient_prefix}-{study_no // _STUDIES_PER_PATIENT + 1:06d}",
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=f"{series_uid}.{inst_no + 1}",
            series_number=series_no + 1,
            instance_number=inst_no + 1,
        )


def make_instance(
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    rows: int = 16,
    cols: int = 16,
    seed: int = 0,
    patient_name: str = "TESTKIT^PATIENT",
    instance_number: int = 1,
    series_number: int = 1,
    extra_bytes: int = 0,
    study_date: str = "20240101",
    modality: str = "OT",
    accession: str = "",
) -> bytes:
    """Return a Part-10 DICOM file (explicit VR little endian) as bytes.

    Pixel data are 16-bit MONOCHROME2 noise drawn from ``seed``, so different seeds give
    different files. ``extra_bytes`` adds an incompressible private OB element of about
    that size, to reach a target file size without changing the image geometry.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "migrator testkit"
    ds.SeriesDescription = f"series {series_number}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(rows, cols), dtype="<u2")
    if extra_bytes > 0:
        padding = rng.bytes(extra_bytes + (extra_bytes & 1))
        ds.private_block(0x0009, _PRIVATE_CREATOR, create=True).add_new(0x01, "OB", padding)
    ds.PixelData = pixels.tobytes()

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _layout(n_instances: int, studies: int | None, series_per_study: int) -> tuple[int, int]:
    """Return (number of studies, instances per series) for a dataset of this size."""
    if studies is None:
        per_series = _INSTANCES_PER_SERIES
        studies = max(1, math.ceil(n_instances / (per_series * series_per_study)))
    else:
        studies = max(1, studies)
        per_series = max(1, math.ceil(n_instances / (studies * series_per_study)))
    return studies, per_series


def iter_dataset(
    n_instances: int,
    *,
    studies: int | None = None,
    series_per_study: int = 2,
    seed: int = 0,
    size: int = 16,
    extra_bytes: int = 0,
) -> Iterator[SyntheticInstance]:
    """Yield ``n_instances`` generated instances, lazily (constant memory).

    Instances fill series of about ten (or evenly over ``studies`` when given),
    ``series_per_study`` series per study and two studies per patient. UIDs live under
    :data:`UID_ROOT` and include ``seed``, so datasets with different seeds never share
    an instance; the same arguments always give the same bytes.
    """
    series_per_study = max(1, series_per_study)
    _, per_series = _layout(n_instances, studies, series_per_study)
    for slot in iter_slots(
        n_instances,
        patient_prefix=f"TK{seed}",
        uid_root=f"{UID_ROOT}{seed}",
        per_series=per_series,
        series_per_study=series_per_study,
    ):
        yield slot.instance(
            make_instance(
                *slot.ids,
                rows=size,
                cols=size,
                # Mix in the seed so two datasets differ in pixels as well as in UIDs.
                seed=seed * 1_000_003 + slot.index,
                patient_name=f"TESTKIT^{slot.patient_id}",
                instance_number=slot.instance_number,
                series_number=slot.series_number,
                extra_bytes=extra_bytes,
            )
        )


def make_dataset(
    n_instances: int,
    *,
    studies: int | None = None,
    series_per_study: int = 2,
    seed: int = 0,
    size: int = 16,
    extra_bytes: int = 0,
) -> list[SyntheticInstance]:
    """Return :func:`iter_dataset` as a list (fine for up to a few thousand files)."""
    return list(
        iter_dataset(
            n_instances,
            studies=studies,
            series_per_study=series_per_study,
            seed=seed,
            size=size,
            extra_bytes=extra_bytes,
        )
    )


def upload_all(
    orthanc: OrthancProcess | str,
    blobs: Iterable[bytes | SyntheticInstance],
    concurrency: int = 8,
    *,
    auth: tuple[str, str] | None = None,
    retries: int = 3,
) -> list[dict[str, Any]]:
    """POST every file to ``/instances`` in parallel; return the answers in input order.

    ``orthanc`` is a running :class:`OrthancProcess` or a base URL (e.g. a proxy's), in
    which case ``auth`` gives the credentials.

    ``blobs`` is consumed lazily with at most ``2 * concurrency`` files in flight, so a
    generator of thousands of files does not have to fit in memory. Transport errors and
    409 conflicts are retried ``retries`` times (POST /instances is idempotent); any other
    failure raises.
    """
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        # One connection per worker thread: no pool contention, and a stale keep-alive
        # connection only affects the request that trips over it.
        if not hasattr(local, "client"):
            if isinstance(orthanc, str):
                local.client = httpx.Client(
                    base_url=orthanc,
                    auth=auth,
                    timeout=120.0,
                    limits=httpx.Limits(keepalive_expiry=0.5),
                )
            else:
                local.client = orthanc.client(timeout=120.0)
            with lock:
                clients.append(local.client)
        return local.client  # type: ignore[no-any-return]

    def post(data: bytes) -> dict[str, Any]:
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                resp = client().post(
                    "instances", content=data, headers={"Content-Type": "application/dicom"}
                )
            except httpx.TransportError:
                if last:
                    raise
                continue
            if resp.status_code == 409 and not last:
                continue
            resp.raise_for_status()
            return dict(resp.json())
        raise AssertionError("unreachable")

    results: dict[int, dict[str, Any]] = {}
    pending: dict[Future[dict[str, Any]], int] = {}
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for index, blob in enumerate(blobs):
                data = blob.data if isinstance(blob, SyntheticInstance) else blob
                pending[pool.submit(post, data)] = index
                if len(pending) >= 2 * concurrency:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        results[pending.pop(fut)] = fut.result()
            for fut in list(pending):
                results[pending.pop(fut)] = fut.result()
    finally:
        for c in clients:
            c.close()
    return [results[i] for i in range(len(results))]


def without_pixel_data(data: bytes) -> bytes:
    """The same instance with Rows/Columns kept and its PixelData removed (as in MR
    spectroscopy, or a header-only copy of Orthanc's storage)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def orthanc_compressed(data: bytes) -> bytes:
    """A file as Orthanc stores it with StorageCompression: the uncompressed size as a
    little-endian 64-bit prefix, then zlib."""
    return struct.pack("<Q", len(data)) + zlib.compress(data)
