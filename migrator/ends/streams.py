"""Streamed transfers: a large instance flows from its source into the target's POST.

Small instances are fetched whole, then stored: one read and one write each, the least
CPU per request. An instance larger than `STREAM_ABOVE` would otherwise be held in memory
whole (several times over, counting the copies on the way), so it is streamed instead:
the source yields chunks (an HTTP answer, a file, a decompressing reader), `Body` feeds
them to the target's ``POST /instances`` under a ``Content-Length`` known beforehand, and
computes the MD5 on the way. Memory is a few chunks per transfer whatever the size.

Nothing corrupt is ever stored: `Body` holds back the last chunk until the whole source
was read, its length matched the announced ``Content-Length`` and its MD5 the expected
one (a folder index's). The target cannot store a file it did not receive whole (Orthanc
answers a body cut short with 400, and the connection is dropped before that anyway), so
a failure found at the end aborts the upload: the row is never `sent`, and the failure
is the source's (see `Body.failure`). That costs nothing more than one read of the source,
unlike checking the MD5 in a first pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from migrator.ends.compression import CorruptFile, is_zlib_with_size
from migrator.errors import Kind, TransferError, Verdict

# Instances larger than this are streamed; smaller ones keep the whole-bytes path.
STREAM_ABOVE = 16 * 1024 * 1024
# Bytes per chunk handed to the target's connection (and read from a file at a time).
CHUNK = 1024 * 1024
# Chunks of a file read ahead of the one being sent, at most.
READ_AHEAD = 4
# Chunks sent whose hash is still to come, at most (the hash lags now and then).
HASH_BEHIND = 4
# What a streamed transfer holds, for the memory budget: the chunks read ahead and not
# yet hashed, the one held back, and the sockets' read-ahead.
STREAM_BUFFERS = (READ_AHEAD + HASH_BEHIND + 2) * CHUNK
# Compressed input read at a time from an Orthanc "zlib with size" file.
_COMPRESSED_READ = 1024 * 1024

__all__ = [
    "CHUNK",
    "STREAM_ABOVE",
    "STREAM_BUFFERS",
    "Body",
    "Chunks",
    "FileChunks",
    "memory_need",
    "open_file_chunks",
    "streamable",
]


def streamable(size: int | None) -> bool:
    """Whether an instance of `size` bytes (None: unknown) is large enough to stream."""
    return size is not None and size > STREAM_ABOVE


def memory_need(size: int | None) -> int | None:
    """Bytes of the memory budget a transfer of `size` holds: the whole instance when it
    is fetched whole, a few buffers when it is streamed."""
    return STREAM_BUFFERS if streamable(size) else size


class Chunks(Protocol):
    """A source's body, read in chunks: `length` bytes in all, announced beforehand.

    Iterating raises `TransferError` for the source's failures (a network error, a file
    that cannot be read, a corrupt compressed stream).
    """

    length: int
    # The MD5 of the whole body when the source knows it beforehand (an Orthanc keeps
    # each file's), or computes it itself as it reads (`hashes`: then its `digest()`
    # gives it after the last chunk): either way the body is not hashed again on the way.
    md5: str | None
    hashes: bool

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The chunks, in order."""
        ...

    async def aclose(self) -> None:
        """Release the file or connection (also when not read to the end)."""
        ...


class Body:
    """The body of a streamed ``POST /instances``: the chunks of `source`, checked.

    Exactly ``source.length`` bytes, or the upload is aborted before its last byte: the
    last chunk is held back until the source ended, had the announced length and, when
    `expected_md5` is given, that MD5. A source failure is kept in `failure` and raised;
    the store then fails with it, and the caller charges it to the source.

    Without an MD5 to check, one the source already knows (``source.md5``) is taken as
    the body's rather than computed: the target receives a body whole before parsing it,
    and hashing on the way (~0.6 GB/s) held the upload back (600 MB: 1.1 s of 5 s).
    Nor is one computed when it is not to be recorded either (`record` False: a target
    without byte proof); `md5` is then the source's, if any.
    """

    def __init__(
        self, source: Chunks, expected_md5: str | None, name: str, record: bool = True
    ) -> None:
        self.source = source
        self.length = source.length
        self.expected_md5 = expected_md5
        self.name = name
        # Whether an MD5 is computed only to be recorded (when none is to be checked).
        self.record = record
        self.md5: str | None = None
        self.complete = False
        self.failure: TransferError | None = None
        # Seconds spent waiting for the source's chunks (the rest is the target's).
        self.source_seconds = 0.0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        known = None if self.expected_md5 else getattr(self.source, "md5", None)
        unwanted = not (self.expected_md5 or self.record)
        if unwanted:
            skip = getattr(self.source, "skip_hash", None)
            if skip is not None:
                skip()
        elif known is None and not self.expected_md5:
            # Only recorded: the source may hash apart from what it hands out.
            apart = getattr(self.source, "hash_apart", None)
            if apart is not None:
                apart()
        hashed = unwanted or known is not None or getattr(self.source, "hashes", False)
        digest = None if hashed else hashlib.md5(usedforsecurity=False)
        count = 0
        held = b""
        chunks = aiter(self.source)
        try:
            while True:
                began = time.monotonic()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                finally:
                    self.source_seconds += time.monotonic() - began
                count += len(chunk)
                if count > self.length:
                    raise self._fail(
                        Kind.RETRYABLE, f"longer than the {self.length} bytes announced"
                    )
                if digest is not None:
                    digest.update(chunk)
                if held:
                    yield held
                held = chunk
        except TransferError as exc:
            self.failure = exc
            raise
        if count != self.length:
            raise self._fail(
                Kind.RETRYABLE, f"ended after {count} of the {self.length} bytes announced"
            )
        finish = None
        if digest is None and known is None and not unwanted:
            finish = getattr(self.source, "digest", None)
        if finish is not None and not self.expected_md5:
            # Nothing to check the MD5 against, only to record: the last byte goes at
            # once, and the source's hashing of the last chunks ends while the target
            # parses and stores the file (the answer is read after this).
            if held:
                yield held
            try:
                self.md5 = await finish()
            except TransferError as exc:
                self.failure = exc
                raise
            self.complete = True
            return
        if digest is not None:
            md5 = digest.hexdigest()
        else:
            md5 = await finish() if finish is not None else self.source.md5
        if self.expected_md5 and md5 != self.expected_md5:
            raise self._fail(
                Kind.PERMANENT,
                f"source file corrupt: MD5 {md5} differs from expected {self.expected_md5}",
                plain=True,
            )
        self.md5 = md5
        if held:
            yield held
        self.complete = True

    def _fail(self, kind: Kind, what: str, *, plain: bool = False) -> TransferError:
        reason = what if plain else f"source {self.name} {what}"
        self.failure = TransferError(Verdict(kind, reason))
        return self.failure


class FileChunks:
    """The DICOM bytes of a file, decompressed on the way when it is an Orthanc "zlib
    with size" file (whose 8-byte prefix gives `length`).

    Reading, inflating, hashing and sending overlap, each at its own pace: a thread of
    its own reads (and inflates) the chunks, another hashes them in order, and the event
    loop sends them. The MD5 (~0.6 GB/s) is the slowest of the three and sets the pace;
    the others keep up with it instead of taking turns with it (read, inflated, hashed
    and sent a chunk at a time in lock step, a 600 MB compressed storage file took 2.7 s
    to send, 2.0 s now, and 0.6 s less CPU). Memory stays bounded: at most `READ_AHEAD`
    chunks read and not yet sent, and `HASH_BEHIND` waiting for the hash.

    Without an MD5 to check (`hash_apart`), the hashing thread reads the file itself
    (``pread`` on a descriptor of its own) instead of taking the chunks sent: the upload
    then goes at the pace of the file and the target, and the hash, recorded only, ends
    while the target parses and stores the file (600 MB plain file: 0.6 s less of 5.5). A
    file that changed between the two reads fails the transfer when its length or zlib
    stream no longer add up; otherwise `verify` finds the recorded MD5 differs from the
    target's.

    Build it with `open_file_chunks`; iterate it once.
    """

    def __init__(self, fh: object, length: int, compressed: bool, head: bytes) -> None:
        self._fh = fh
        self.length = length
        self.compressed = compressed
        # The MD5 is computed here, as the chunks are read (see `digest`).
        self.hashes = True
        self.md5: str | None = None
        self._digest = hashlib.md5(usedforsecurity=False)
        # The first bytes of the file as stored (what sniffing it read).
        self.start = head if not compressed else b""
        # Bytes read while sniffing the file, handed out (or inflated) first.
        self._head = head
        self._engine = zlib.decompressobj() if compressed else None
        self._pending = b""  # compressed input not yet inflated
        self._out = 0
        # Set once the reader stopped and closed the file; None until it started.
        self._closed: asyncio.Future[None] | None = None
        self._hashed: asyncio.Future[None] | None = None
        self._stop = threading.Event()
        self._slots = threading.Semaphore(READ_AHEAD)
        self._to_hash: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._hash_room = threading.Semaphore(HASH_BEHIND)
        # Whether the hasher reads the file apart (`hash_apart`), whether nothing is
        # hashed (`skip_hash`), and what stopped the hasher.
        self._apart = False
        self._unhashed = False
        self._abandoned = threading.Event()
        self._hash_failure: Exception | None = None

    def hash_apart(self) -> bool:
        """Hash the file from a read of its own rather than the chunks handed out (when
        there is no MD5 to check before the last byte goes). Only a file has one to
        give: returns whether the hashing will be so."""
        if self._closed is not None:
            return False  # already being read
        try:
            self._fh.fileno()  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            return False  # a database large object, say
        self._apart = True
        return True

    def skip_hash(self) -> None:
        """Hash nothing: there is no MD5 to check or to record (`digest` must not be
        asked for)."""
        if self._closed is None:
            self._unhashed = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        finished = False
        self._closed = loop.create_future()
        self._hashed = loop.create_future()
        if self._unhashed:
            self._hashed.set_result(None)
        elif self._apart:
            # Its own descriptor: the reader closes the file when it is done.
            fd = os.dup(self._fh.fileno())  # type: ignore[attr-defined]
            threading.Thread(
                target=self._hash_file, args=(fd, loop, self._hashed), name="md5", daemon=True
            ).start()
        else:
            threading.Thread(
                target=self._hash_all, args=(loop, self._hashed), name="md5", daemon=True
            ).start()
        threading.Thread(
            target=self._read_all, args=(loop, ready, self._closed), name="read", daemon=True
        ).start()
        try:
            while True:
                item = await ready.get()
                if isinstance(item, CorruptFile):
                    raise TransferError(Verdict(Kind.PERMANENT, f"corrupt file: {item}"))
                if isinstance(item, OSError):
                    raise TransferError(Verdict(Kind.RETRYABLE, f"cannot read the file: {item}"))
                if isinstance(item, BaseException):
                    raise item
                if not item:
                    finished = True
                    return
                yield item
                # Sent (the connection asks for the next): the reader may read one more.
                self._slots.release()
        finally:
            if not finished:
                self._abandoned.set()
            self._halt()

    def _read_all(
        self,
        loop: asyncio.AbstractEventLoop,
        ready: asyncio.Queue[bytes | BaseException],
        closed: asyncio.Future[None],
    ) -> None:
        """The reader thread: every chunk, in order, to the hasher and to the sender,
        then b"" (or the exception that stopped it); the file is closed at the end."""
        try:
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    break
                try:
                    chunk = self._next()
                except (OSError, CorruptFile) as exc:
                    _hand(loop, ready.put_nowait, exc)
                    break
                if chunk and not (self._apart or self._unhashed):
                    self._hash_room.acquire()
                    self._to_hash.put(chunk)
                _hand(loop, ready.put_nowait, chunk)
                if not chunk:
                    break
        except BaseException as exc:  # handed to the loop, raised there
            _hand(loop, ready.put_nowait, exc)
        finally:
            self._to_hash.put(None)
            try:
                self._fh.close()  # type: ignore[attr-defined]
            finally:
                _hand(loop, _settle, closed)

    def _hash_all(self, loop: asyncio.AbstractEventLoop, hashed: asyncio.Future[None]) -> None:
        """The hashing thread: the chunks in the order read, until the reader ends."""
        try:
            while (chunk := self._to_hash.get()) is not None:
                self._hash_room.release()
                self._digest.update(chunk)
        finally:
            _hand(loop, _settle, hashed)

    def _hash_file(
        self, fd: int, loop: asyncio.AbstractEventLoop, hashed: asyncio.Future[None]
    ) -> None:
        """The hashing thread of `hash_apart`: the file's DICOM bytes read (and inflated)
        from `fd` on their own, until the end or until the transfer is abandoned."""
        try:
            self._hash_failure = self._hash_from(fd)
        except (OSError, CorruptFile) as exc:
            self._hash_failure = exc
        finally:
            os.close(fd)
            _hand(loop, _settle, hashed)

    def _hash_from(self, fd: int) -> Exception | None:
        engine = zlib.decompressobj() if self.compressed else None
        # A compressed file's DICOM bytes follow its 8-byte size prefix.
        at = 8 if self.compressed else 0
        count = 0
        while not self._abandoned.is_set():
            data = os.pread(fd, _COMPRESSED_READ if engine else CHUNK, at)
            if not data:
                break
            at += len(data)
            while data:
                if engine is None:
                    part, data = data, b""
                else:
                    try:
                        part = engine.decompress(data, CHUNK)
                    except zlib.error as exc:
                        return CorruptFile(f"bad zlib stream: {exc}")
                    data = engine.unconsumed_tail
                count += len(part)
                if count > self.length:
                    return CorruptFile(f"longer than the {self.length} bytes read before")
                self._digest.update(part)
            if engine is not None and engine.eof:
                break
        if not self._abandoned.is_set() and count != self.length:
            return CorruptFile(f"{count} bytes, not the {self.length} read before")
        return None

    def _halt(self) -> None:
        """Stop the reader (iteration ended or was abandoned): wake it if it waits."""
        self._stop.set()
        for _ in range(READ_AHEAD):
            self._slots.release()

    async def digest(self) -> str:
        """The MD5 of every chunk handed out (call it after the last one), also set as
        `md5`."""
        assert self._hashed is not None, "digest() before the chunks were read"
        await asyncio.shield(self._hashed)
        if self._hash_failure is not None:
            raise TransferError(
                Verdict(
                    Kind.RETRYABLE,
                    f"the file changed while it was sent (hashing it: {self._hash_failure})",
                )
            )
        self.md5 = self._digest.hexdigest()
        return self.md5

    def _next(self) -> bytes:
        if self._engine is None:
            if self._head:
                head, self._head = self._head, b""
                return head + self._fh.read(CHUNK - len(head))  # type: ignore[attr-defined]
            return self._fh.read(CHUNK)  # type: ignore[attr-defined]
        return self._inflate()

    def _inflate(self) -> bytes:
        engine = self._engine
        assert engine is not None
        parts: list[bytes] = []
        wanted = CHUNK
        while wanted > 0 and not engine.eof:
            if not self._pending:
                self._pending = self._head or self._fh.read(_COMPRESSED_READ)  # type: ignore[attr-defined]
                self._head = b""
                if not self._pending:
                    raise CorruptFile(f"zlib stream truncated ({self._out} of {self.length} bytes)")
            try:
                # Bounded output: a corrupt stream cannot inflate without limit.
                part = engine.decompress(self._pending, wanted)
            except zlib.error as exc:
                raise CorruptFile(f"bad zlib stream: {exc}") from exc
            self._pending = engine.unconsumed_tail
            if part:
                parts.append(part)
                wanted -= len(part)
                self._out += len(part)
            if self._out > self.length:
                raise CorruptFile(f"inflates beyond the {self.length} bytes declared")
        if engine.eof and not parts and self._out != self.length:
            raise CorruptFile(
                f"size mismatch: {self._out} bytes decompressed, {self.length} declared"
            )
        return b"".join(parts)

    async def aclose(self) -> None:
        """Close the file (once the reader thread let go of it, when it was started)."""
        if self._closed is None:
            self._fh.close()  # type: ignore[attr-defined]
            return
        self._halt()
        await asyncio.shield(self._closed)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _hand(loop: asyncio.AbstractEventLoop, call: Callable[..., object], *args: object) -> None:
    """Run `call(*args)` in the event loop's thread (nothing, once the loop is closed: the
    transfer that waited for it is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(call, *args)


def open_file_chunks(path: str) -> FileChunks | None:
    """A chunked reader of the DICOM bytes of `path`, or None when the file is small
    enough to be read whole (or cannot be told apart from a plain file by its start: a
    Part-10 file whose preamble looks like a size prefix, read whole as before).

    Raises `OSError` as `open` does. Runs file I/O: call it in a thread.
    """
    fh = open(path, "rb")  # noqa: SIM115 (closed by FileChunks.aclose)
    try:
        size = os.fstat(fh.fileno()).st_size
        if size <= STREAM_ABOVE:
            fh.close()
            return None
        head = fh.read(132)
        compressed = is_zlib_with_size(head[:10])
        if compressed and head[128:132] == b"DICM":
            fh.close()
            return None
        if not compressed:
            return FileChunks(fh, size, False, head)
        (declared,) = struct.unpack_from("<Q", head)
        if declared <= STREAM_ABOVE:
            fh.close()
            return None
        return FileChunks(fh, declared, True, head[8:])
    except BaseException:
        fh.close()
        raise
