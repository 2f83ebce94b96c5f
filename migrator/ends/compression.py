"""Orthanc's "zlib with size" storage format: an 8-byte little-endian size, then a zlib
stream. Storage folders, index databases and streamed transfers all read it."""

from __future__ import annotations

import struct
import zlib

__all__ = ["CorruptFile", "decompress_zlib_with_size", "is_zlib_with_size"]

# Guards decompression against a corrupt size prefix claiming terabytes.
_MAX_DECLARED_SIZE = 1 << 40


class CorruptFile(ValueError):
    """A stored file cannot be turned back into DICOM bytes (bad zlib stream, bad size)."""


def is_zlib_with_size(head: bytes) -> bool:
    """Tell whether ``head`` (at least 10 bytes) starts like an Orthanc compressed file.

    The layout is an 8-byte little-endian size followed by a zlib stream, whose two-byte
    header starts with 0x78 and is a multiple of 31 when read big-endian.
    """
    if len(head) < 10 or head[8] != 0x78:
        return False
    if (head[8] << 8 | head[9]) % 31 != 0:
        return False
    (declared,) = struct.unpack_from("<Q", head)
    return 0 < declared <= _MAX_DECLARED_SIZE


def decompress_zlib_with_size(raw: bytes) -> bytes:
    """Decompress an Orthanc "zlib with size" file; raise :class:`CorruptFile` if damaged."""
    if len(raw) < 8:
        raise CorruptFile(f"compressed file too short ({len(raw)} bytes)")
    (declared,) = struct.unpack_from("<Q", raw)
    if declared > _MAX_DECLARED_SIZE:
        raise CorruptFile(f"implausible uncompressed size {declared}")
    engine = zlib.decompressobj()
    try:
        # Asking for one byte more than declared detects a stream longer than its prefix
        # without letting a corrupt stream inflate without bound.
        data = engine.decompress(raw[8:], declared + 1)
    except zlib.error as exc:
        raise CorruptFile(f"bad zlib stream: {exc}") from exc
    if not engine.eof:
        raise CorruptFile(
            f"zlib stream truncated or longer than declared ({len(data)} of {declared} bytes)"
        )
    if len(data) != declared:
        raise CorruptFile(f"size mismatch: {len(data)} bytes decompressed, {declared} declared")
    return data
