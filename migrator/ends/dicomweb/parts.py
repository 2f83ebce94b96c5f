"""A WADO-RS answer's one part read as it arrives: large instances are streamed from a
DICOMweb source into the target instead of being held whole.

The part's own Content-Length (Orthanc's DICOMweb plugin, like most servers, sends one
per part) is the body's announced length. The answer must close right after the part
(its closing delimiter, no second part): that is checked before the part's last chunk is
handed out, so a target never receives the whole of an answer that was cut short or says
more than asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from migrator.ends.dicomweb.multipart import part_length
from migrator.ends.streams import CHUNK
from migrator.errors import Kind, TransferError, Verdict, classify_exception

__all__ = ["PartChunks", "first_part"]

# Bytes read at most to find the first part's headers.
HEAD_MOST = 64 * 1024


async def first_part(
    pieces: AsyncIterator[bytes], boundary: str
) -> tuple[bytes, tuple[int, int] | None]:
    """Read a multipart answer up to the end of its first part's headers: what was read,
    and where the part's body starts in it with its announced length, or None when no
    length is announced (or the answer does not start like a multipart)."""
    delimiter = b"--" + boundary.encode("latin-1")
    read = b""
    while (end := read.find(b"\r\n\r\n")) < 0:
        if len(read) > HEAD_MOST:
            return read, None
        piece = await anext(pieces, None)
        if piece is None:
            return read, None
        read += piece
    start = read.find(delimiter)
    if start < 0 or start > end:
        return read, None
    length = part_length(read[start + len(delimiter) : end])
    return read, None if length is None else (end + 4, length)


class PartChunks:
    """The one part of a WADO-RS answer, in chunks of about `streams.CHUNK` bytes (see
    `streams.Chunks`); `length` is the part's Content-Length."""

    def __init__(
        self,
        response: httpx.Response,
        pieces: AsyncIterator[bytes],
        first: bytes,
        length: int,
        boundary: str,
        role: str,
    ) -> None:
        self._response = response
        self._pieces = pieces
        # The part's bytes read with its headers.
        self._first = first
        self.length = length
        self._closing = b"\r\n--" + boundary.encode("latin-1") + b"--"
        self._role = role
        self.md5: str | None = None
        self.hashes = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        left = self.length
        parts: list[bytes] = []
        size = 0
        after = b""  # what follows the part
        piece, self._first = self._first, b""
        try:
            while True:
                if len(piece) > left:
                    piece, after = piece[:left], piece[left:]
                if piece:
                    parts.append(piece)
                    size += len(piece)
                    left -= len(piece)
                if not left:
                    break
                if size >= CHUNK:
                    yield b"".join(parts)
                    parts, size = [], 0
                piece = await anext(self._pieces, b"")
                if not piece:
                    raise self._fail(f"cut short ({self.length - left} of {self.length} bytes)")
            while len(after) < len(self._closing):
                more = await anext(self._pieces, b"")
                if not more:
                    break
                after += more
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self._role)) from None
        if not after.startswith(self._closing):
            raise self._fail("does not close after its part (cut short, or a second part)")
        yield b"".join(parts)

    def _fail(self, what: str) -> TransferError:
        return TransferError(Verdict(Kind.RETRYABLE, f"{self._role} WADO-RS answer {what}"))

    async def aclose(self) -> None:
        """Release the connection (closed, when the answer was not read to its end)."""
        await self._response.aclose()
