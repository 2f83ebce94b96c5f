"""multipart/related bodies as DICOMweb uses them (RFC 2387): WADO-RS answers and
STOW-RS requests carrying DICOM files.

Parts are sliced out of the body without copying headers into objects: a part's bytes
are exactly what the server sent (``transfer-syntax=*`` keeps the stored file), which is
what makes a DICOMweb transfer between two Orthancs byte-identical. A body that stops
before its closing delimiter was cut short on the way and raises `Truncated`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

__all__ = [
    "Truncated",
    "boundary_of",
    "part_length",
    "related_body",
    "related_frame",
    "split_related",
]

_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


class Truncated(ValueError):
    """The body ended before the multipart's closing delimiter (or is malformed)."""


def boundary_of(content_type: str) -> str | None:
    """The boundary parameter of a multipart Content-Type, or None."""
    if not content_type.lower().lstrip().startswith("multipart/"):
        return None
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    return found.group(1) or found.group(2)


def split_related(body: bytes, boundary: str) -> list[bytes]:
    """The parts' bodies (headers removed), in order.

    Raises `Truncated` when a part is not terminated by a delimiter, or when the closing
    delimiter (``--boundary--``) is missing: the answer was cut short.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    view = memoryview(body)
    start = body.find(delimiter)
    if start < 0:
        raise Truncated("no multipart delimiter in the answer")
    parts: list[bytes] = []
    pos = start + len(delimiter)
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise Truncated("a part's headers end early")
        begin = head_end + 4
        declared = part_length(body[pos:head_end])
        closing = b"\r\n" + delimiter
        if declared is not None:
            # The announced length spares searching the whole part for the delimiter.
            end = begin + declared
            if body[end : end + len(closing)] != closing:
                raise Truncated(
                    f"a part announced {declared} bytes and was not followed by a delimiter"
                )
        else:
            # The delimiter is always preceded by CRLF, which belongs to it (RFC 2046).
            end = body.find(closing, begin)
            if end < 0:
                raise Truncated("a part is not followed by a delimiter")
        parts.append(bytes(view[begin:end]))
        pos = end + 2 + len(delimiter)


def part_length(head: bytes) -> int | None:
    """The Content-Length among a part's headers (None: absent or unreadable)."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def related_body(
    parts: Iterable[bytes], media_type: str = "application/dicom"
) -> tuple[bytes, str]:
    """A multipart/related body of `parts` and its Content-Type header."""
    head, end, content_type = related_frame(media_type)
    chunks: list[bytes] = []
    for part in parts:
        chunks += [head, part, b"\r\n"]
    chunks.append(end)
    return b"".join(chunks), content_type


def related_frame(media_type: str = "application/dicom") -> tuple[bytes, bytes, str]:
    """The frame of a multipart/related body with a boundary of its own: what goes before
    each part (each part is followed by CRLF), what ends the body, and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode("latin-1")
    end = f"--{boundary}--\r\n".encode("latin-1")
    content_type = f'multipart/related; type="{media_type}"; boundary={boundary}'
    return head, end, content_type
