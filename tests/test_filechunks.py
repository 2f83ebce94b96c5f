"""A large file read in chunks (`streams.FileChunks`): reading, inflating and hashing run
in threads of their own beside the sending, and every path ends with the file closed and
the threads gone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest

from migrator.ends.compression import CorruptFile
from migrator.ends.streams import CHUNK, STREAM_ABOVE, Body, FileChunks, open_file_chunks
from migrator.errors import Kind, TransferError

SIZE = STREAM_ABOVE + 3 * CHUNK + 12_345


@pytest.fixture(scope="module")
def data() -> bytes:
    """Incompressible bytes, larger than the streaming threshold."""
    return os.urandom(SIZE)


def write_plain(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_compressed(path: Path, data: bytes) -> Path:
    """An Orthanc "zlib with size" file: 8-byte little-endian size, then a zlib stream."""
    path.write_bytes(struct.pack("<Q", len(data)) + zlib.compress(data, 1))
    return path


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("read", "md5")]


async def read_all(chunks: FileChunks) -> tuple[bytes, list[int]]:
    parts = [chunk async for chunk in chunks]
    await chunks.aclose()
    return b"".join(parts), [len(part) for part in parts]


async def send_body(body: Body, chunks: FileChunks, received: list[bytes] | None = None) -> bytes:
    """Read `body` as a target's connection does, each chunk kept in `received` as it
    comes (what the target got when the body fails), then close `chunks`."""
    received = [] if received is None else received
    try:
        async for chunk in body:
            received.append(chunk)
    finally:
        await chunks.aclose()
    return b"".join(received)


@pytest.mark.parametrize("writer", [write_plain, write_compressed], ids=["plain", "compressed"])
def test_every_byte_comes_once_in_order_with_its_md5(tmp_path, data, writer):
    chunks = open_file_chunks(str(writer(tmp_path / "f", data)))
    assert isinstance(chunks, FileChunks)
    assert chunks.length == len(data)

    async def run() -> tuple[bytes, list[int], str]:
        body, sizes = await read_all(chunks)
        return body, sizes, await chunks.digest()

    body, sizes, md5 = asyncio.run(run())
    assert body == data
    assert max(sizes) <= CHUNK
    assert md5 == chunks.md5 == hashlib.md5(data).hexdigest()
    assert chunks._fh.closed  # type: ignore[attr-defined]
    assert not stream_threads()


@pytest.mark.parametrize("writer", [write_plain, write_compressed], ids=["plain", "compressed"])
def test_abandoned_reading_closes_the_file_and_ends_its_threads(tmp_path, data, writer):
    """An upload that fails after a few chunks: closing the chunks stops the reader (also
    when it waits for room to read ahead) and closes the file."""
    chunks = open_file_chunks(str(writer(tmp_path / "f", data)))
    assert chunks is not None

    async def run() -> None:
        it = aiter(chunks)
        await anext(it)
        await anext(it)
        await asyncio.sleep(0.05)  # the reader has filled its read-ahead and waits
        await it.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(chunks.aclose(), 5)

    asyncio.run(run())
    assert chunks._fh.closed  # type: ignore[attr-defined]
    for thread in stream_threads():
        thread.join(5)
    assert not stream_threads()


def test_chunks_never_read_are_closed_at_once(tmp_path, data):
    chunks = open_file_chunks(str(write_plain(tmp_path / "f", data)))
    assert chunks is not None
    asyncio.run(chunks.aclose())
    assert chunks._fh.closed  # type: ignore[attr-defined]


def test_truncated_compressed_file_is_a_permanent_failure(tmp_path, data):
    path = write_compressed(tmp_path / "f", data)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - CHUNK])  # still larger than the threshold
    chunks = open_file_chunks(str(path))
    assert chunks is not None

    with pytest.raises(TransferError) as caught:
        asyncio.run(read_all(chunks))
    assert caught.value.verdict.kind is Kind.PERMANENT
    assert "truncated" in caught.value.verdict.reason
    for thread in stream_threads():
        thread.join(5)
    assert chunks._fh.closed  # type: ignore[attr-defined]


def test_md5_differing_from_the_expected_one_holds_the_last_chunk_back(tmp_path, data):
    """With an MD5 to check (a storage index's), the body ends in a failure before its
    last chunk: the target never receives the whole file."""
    chunks = open_file_chunks(str(write_compressed(tmp_path / "f", data)))
    assert chunks is not None
    body = Body(chunks, "0" * 32, "f")
    received: list[bytes] = []

    with pytest.raises(TransferError):
        asyncio.run(send_body(body, chunks, received))
    assert body.failure is not None and "MD5" in body.failure.verdict.reason
    assert sum(map(len, received)) < len(data)
    assert not body.complete


def test_expected_md5_passes_the_whole_body(tmp_path, data):
    chunks = open_file_chunks(str(write_plain(tmp_path / "f", data)))
    assert chunks is not None
    body = Body(chunks, hashlib.md5(data).hexdigest(), "f")

    assert asyncio.run(send_body(body, chunks)) == data
    assert body.complete and body.md5 == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("writer", [write_plain, write_compressed], ids=["plain", "compressed"])
def test_without_an_md5_to_check_the_file_is_hashed_apart(tmp_path, data, writer):
    """Nothing to check the MD5 against: the hasher reads the file itself, so the body
    goes at the file's pace; the MD5 recorded is still the DICOM bytes'."""
    chunks = open_file_chunks(str(writer(tmp_path / "f", data)))
    assert chunks is not None
    body = Body(chunks, None, "f")

    assert asyncio.run(send_body(body, chunks)) == data
    assert chunks._apart  # the hasher read the file on its own
    assert body.complete and body.md5 == hashlib.md5(data).hexdigest()
    assert chunks._fh.closed  # type: ignore[attr-defined]
    for thread in stream_threads():
        thread.join(5)
    assert not stream_threads()


@pytest.mark.parametrize("writer", [write_plain, write_compressed], ids=["plain", "compressed"])
def test_nothing_to_check_or_record_hashes_nothing(tmp_path, data, writer):
    """No MD5 to check and none to record (a target without byte proof): the body is
    the file's DICOM bytes, and no hashing thread ever runs."""
    chunks = open_file_chunks(str(writer(tmp_path / "f", data)))
    assert chunks is not None
    body = Body(chunks, None, "f", record=False)
    hashers: list[str] = []

    async def send() -> bytes:
        received: list[bytes] = []
        async for chunk in body:
            received.append(chunk)
            hashers.extend(t.name for t in threading.enumerate() if t.name == "md5")
        await chunks.aclose()
        return b"".join(received)

    assert asyncio.run(send()) == data
    assert body.complete and body.md5 is None
    assert hashers == []


def test_a_file_that_grows_while_sent_apart_is_not_recorded(tmp_path, data):
    """More bytes than announced: the transfer fails (retried) rather than recording an
    MD5 of other bytes than those sent, whichever of the two reads finds them first."""
    path = write_plain(tmp_path / "f", data)
    chunks = open_file_chunks(str(path))
    assert chunks is not None
    with path.open("ab") as fh:
        fh.write(b"appended after the size was taken")
    body = Body(chunks, None, "f")

    with pytest.raises(TransferError) as caught:
        asyncio.run(send_body(body, chunks))
    assert caught.value.verdict.kind is Kind.RETRYABLE
    assert body.failure is caught.value and not body.complete and body.md5 is None


@pytest.mark.parametrize("writer", [write_plain, write_compressed], ids=["plain", "compressed"])
def test_the_apart_hasher_refuses_bytes_that_do_not_add_up(tmp_path, data, writer):
    """What the hasher's own read finds is checked against the length the sender had."""
    chunks = open_file_chunks(str(writer(tmp_path / "f", data)))
    assert chunks is not None
    other = writer(tmp_path / "g", data + b"more")
    fd = os.open(other, os.O_RDONLY)
    try:
        failure = chunks._hash_from(fd)
    finally:
        os.close(fd)
        asyncio.run(chunks.aclose())
    assert failure is not None and "longer than" in str(failure)


def test_an_expected_md5_is_checked_on_the_bytes_sent(tmp_path, data):
    """With an MD5 to check, the hasher takes the chunks sent, not a read of its own."""
    chunks = open_file_chunks(str(write_plain(tmp_path / "f", data)))
    assert chunks is not None
    body = Body(chunks, hashlib.md5(data).hexdigest(), "f")
    assert asyncio.run(send_body(body, chunks)) == data
    assert not chunks._apart and body.complete


def test_abandoned_upload_stops_the_apart_hasher(tmp_path, data):
    chunks = open_file_chunks(str(write_plain(tmp_path / "f", data)))
    assert chunks is not None
    assert chunks.hash_apart()

    async def run() -> None:
        it = aiter(chunks)
        await anext(it)
        await it.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(chunks.aclose(), 5)

    asyncio.run(run())
    for thread in stream_threads():
        thread.join(5)
    assert not stream_threads()
    assert chunks._fh.closed  # type: ignore[attr-defined]


def test_a_failed_apart_hash_fails_the_transfer_after_the_last_chunk(tmp_path, data):
    """The hasher's read did not add up after the body went out whole: the row must not
    be `sent` with that MD5, so the body ends in a retryable failure instead."""
    chunks = open_file_chunks(str(write_plain(tmp_path / "f", data)))
    assert chunks is not None
    chunks._hash_from = lambda fd: CorruptFile("7 bytes, not the 8 read before")  # type: ignore[method-assign]
    body = Body(chunks, None, "f")
    received: list[bytes] = []

    with pytest.raises(TransferError) as caught:
        asyncio.run(send_body(body, chunks, received))
    assert caught.value.verdict.kind is Kind.RETRYABLE
    assert "changed while it was sent" in caught.value.verdict.reason
    assert b"".join(received) == data  # the target got it whole: the answer decides nothing
    assert body.failure is caught.value and not body.complete and body.md5 is None
