"""A WADO-RS answer's one part read as it arrives (`dicomweb.parts`): the part's bytes
whatever the pieces the connection hands over, and an answer that does not close right
after the part fails before its last byte is handed on."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from migrator.ends.dicomweb.parts import PartChunks, first_part
from migrator.ends.streams import CHUNK
from migrator.errors import Kind, TransferError

BOUNDARY = "b0und4ry"
PART = os.urandom(3 * CHUNK + 4321)


def _answer(part: bytes, after: bytes, length: int | None = None) -> bytes:
    announced = b"" if length is None else b"Content-Length: %d\r\n" % length
    return (
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n" + announced
        + b"\r\n" + part + after
    )  # fmt: skip


class _Connection:
    """What `PartChunks` reads of an httpx answer: closing it."""

    closed = False

    async def aclose(self) -> None:
        self.closed = True


async def _pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def _read(data: bytes, size: int) -> tuple[list[bytes], TransferError | None, bool]:
    """The chunks handed out before the end or a failure, the failure, and whether the
    connection was closed."""
    pieces = _pieces(data, size)
    read, part = await first_part(pieces, BOUNDARY)
    assert part is not None
    begin, length = part
    connection = _Connection()
    chunks = PartChunks(connection, pieces, read[begin:], length, BOUNDARY, "source")  # type: ignore[arg-type]
    got: list[bytes] = []
    failure = None
    try:
        async for chunk in chunks:
            got.append(chunk)
    except TransferError as exc:
        failure = exc
    finally:
        await chunks.aclose()
    return got, failure, connection.closed


@pytest.mark.parametrize("size", [1000, 65536, 5 * CHUNK])
def test_the_part_comes_whole_in_chunks(size: int) -> None:
    closing = b"\r\n--" + BOUNDARY.encode() + b"--\r\n"
    got, failure, closed = asyncio.run(_read(_answer(PART, closing, len(PART)), size))
    assert failure is None and closed
    assert b"".join(got) == PART
    # About a chunk at a time (more only when the connection hands over more at once).
    assert all(len(chunk) <= max(size, CHUNK) + CHUNK for chunk in got)


@pytest.mark.parametrize(
    "after",
    [
        b"\r\n--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\nmore",
        b"\r\n--" + BOUNDARY.encode()[:4],
        b"",
    ],
    ids=["second-part", "closing-cut", "no-closing"],
)
def test_an_answer_that_does_not_close_fails_before_the_last_byte(after: bytes) -> None:
    got, failure, _ = asyncio.run(_read(_answer(PART, after, len(PART)), 65536))
    assert failure is not None and failure.verdict.kind is Kind.RETRYABLE
    assert sum(map(len, got)) < len(PART)


def test_a_part_cut_short_fails() -> None:
    got, failure, _ = asyncio.run(_read(_answer(PART[: 2 * CHUNK], b"", len(PART)), 65536))
    assert failure is not None and "cut short" in failure.verdict.reason
    assert sum(map(len, got)) < len(PART)


def test_a_part_without_length_is_not_streamed() -> None:
    async def head() -> tuple[bytes, tuple[int, int] | None]:
        return await first_part(_pieces(_answer(PART, b""), 1000), BOUNDARY)

    read, part = asyncio.run(head())
    assert part is None and read.endswith(
        b"\r\n\r\n" + PART[: len(read) - read.find(b"\r\n\r\n") - 4]
    )
