"""Files a folder import reads on the event loop when the page cache holds them
(`fileclass.read_cached`), and on a thread otherwise: same bytes either way."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from migrator.ends.folder import source as folder_source
from migrator.ends.folder.fileclass import read_cached, read_dicom_bytes
from migrator.testkit import make_dataset
from migrator.testkit.dicomgen import orthanc_compressed

pytestmark = pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="Linux only")


def _large(tmp_path: Path, name: str, compressed: bool = False) -> tuple[Path, bytes]:
    """A DICOM file above `INLINE_READ` (its pixels make it ~600 KiB), as written."""
    data = make_dataset(1, seed=181, size=560)[0].data
    assert len(data) > folder_source.INLINE_READ
    path = tmp_path / name
    path.write_bytes(orthanc_compressed(data) if compressed else data)
    return path, data


def _evicted(path: Path) -> bool:
    """Ask the kernel to drop the file from the page cache; whether it did."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return read_cached(str(path), 1 << 30) is None


def test_cached_file_is_read_whole(tmp_path: Path) -> None:
    path, data = _large(tmp_path, "a.dcm")
    assert read_cached(str(path), len(data)) == data
    # Larger than the limit: left to the thread.
    assert read_cached(str(path), len(data) - 1) is None
    assert read_cached(str(tmp_path / "gone.dcm"), 1 << 30) is None
    # A pipe in a file's place is left to the thread, not waited for here.
    os.mkfifo(tmp_path / "pipe.dcm")
    assert read_cached(str(tmp_path / "pipe.dcm"), 1 << 30) is None


def test_uncached_file_is_left_to_a_thread(tmp_path: Path) -> None:
    path, data = _large(tmp_path, "a.dcm")
    if not _evicted(path):
        pytest.skip("this file system keeps the file cached (tmpfs)")
    # The source reads it all the same, on a thread (which brings it into the cache).
    assert asyncio.run(folder_source._read_larger(str(path))) == data
    assert read_cached(str(path), 1 << 30) == data


def test_compressed_storage_file_is_inflated(tmp_path: Path) -> None:
    path, data = _large(tmp_path, "stored", compressed=True)
    assert read_cached(str(path), 1 << 30) == path.read_bytes()
    assert asyncio.run(folder_source._read_larger(str(path))) == data
    assert read_dicom_bytes(str(path)) == data
