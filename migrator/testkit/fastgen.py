"""Fast synthetic DICOM files: thousands per second, for fault and crash tests.

`dicomgen.make_instance` goes through pydicom and costs ~7 ms a file, which is 20 s for
the few thousand instances a convergence test needs. Here the same kind of file (a
Secondary Capture, explicit VR little endian, 8-bit MONOCHROME2 noise) is packed by hand
with `struct`: a few microseconds each. The layout of patients, studies and series and
the returned `SyntheticInstance` are the same as `dicomgen.iter_dataset`'s.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

from migrator.testkit.dicomgen import SECONDARY_CAPTURE, UID_ROOT, SyntheticInstance, iter_slots

__all__ = ["fast_dataset", "fast_instance", "iter_fast_dataset"]

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = UID_ROOT + "99.1"
# VRs whose length field is 4 bytes, after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UR", "UT", "UN", "SV", "UV"}
_PER_SERIES = 10
_SERIES_PER_STUDY = 2


def _element(group: int, elem: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        # UIDs are padded with NUL, everything else here with a space (PS3.5 6.2).
        value += b"\0" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH2s", group, elem, vr.encode())
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def fast_instance(
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    pixels: bytes,
    rows: int,
    cols: int,
    instance_number: int = 1,
    series_number: int = 1,
) -> bytes:
    """A Part-10 file carrying these identifiers and `pixels` (rows * cols bytes)."""
    meta_body = b"".join(
        [
            _element(0x0002, 0x0001, "OB", b"\0\1"),
            _element(0x0002, 0x0002, "UI", SECONDARY_CAPTURE.encode()),
            _element(0x0002, 0x0003, "UI", sop_uid.encode()),
            _element(0x0002, 0x0010, "UI", EXPLICIT_VR_LE.encode()),
            _element(0x0002, 0x0012, "UI", IMPLEMENTATION_UID.encode()),
        ]
    )
    meta = _element(0x0002, 0x0000, "UL", struct.pack("<I", len(meta_body))) + meta_body
    dataset = b"".join(
        [
            _element(0x0008, 0x0005, "CS", b"ISO_IR 100"),
            _element(0x0008, 0x0016, "UI", SECONDARY_CAPTURE.encode()),
            _element(0x0008, 0x0018, "UI", sop_uid.encode()),
            _element(0x0008, 0x0020, "DA", b"20240101"),
            _element(0x0008, 0x0060, "CS", b"OT"),
            _element(0x0010, 0x0010, "PN", f"FAST^{patient_id}".encode()),
            _element(0x0010, 0x0020, "LO", patient_id.encode()),
            _element(0x0020, 0x000D, "UI", study_uid.encode()),
            _element(0x0020, 0x000E, "UI", series_uid.encode()),
            _element(0x0020, 0x0011, "IS", str(series_number).encode()),
            _element(0x0020, 0x0013, "IS", str(instance_number).encode()),
            _element(0x0028, 0x0002, "US", _us(1)),
            _element(0x0028, 0x0004, "CS", b"MONOCHROME2"),
            _element(0x0028, 0x0010, "US", _us(rows)),
            _element(0x0028, 0x0011, "US", _us(cols)),
            _element(0x0028, 0x0100, "US", _us(8)),
            _element(0x0028, 0x0101, "US", _us(8)),
            _element(0x0028, 0x0102, "US", _us(7)),
            _element(0x0028, 0x0103, "US", _us(0)),
            _element(0x7FE0, 0x0010, "OB", pixels),
        ]
    )
    return b"\0" * 128 + b"DICM" + meta + dataset


def iter_fast_dataset(n: int, *, seed: int = 0, size: int = 32) -> Iterator[SyntheticInstance]:
    """Yield `n` instances (size x size pixels each), ten per series, two series per
    study, two studies per patient. UIDs include `seed`, so seeds never collide, and
    they differ from `dicomgen`'s (a ``99.`` branch of the UID root)."""
    rng = random.Random(seed)
    for slot in iter_slots(
        n,
        patient_prefix=f"FG{seed}",
        uid_root=f"{UID_ROOT}99.{seed}",
        per_series=_PER_SERIES,
        series_per_study=_SERIES_PER_STUDY,
    ):
        yield slot.instance(
            fast_instance(
                *slot.ids,
                pixels=rng.randbytes(size * size),
                rows=size,
                cols=size,
                instance_number=slot.instance_number,
                series_number=slot.series_number,
            )
        )


def fast_dataset(n: int, *, seed: int = 0, size: int = 32) -> list[SyntheticInstance]:
    """`iter_fast_dataset` as a list."""
    return list(iter_fast_dataset(n, seed=seed, size=size))
