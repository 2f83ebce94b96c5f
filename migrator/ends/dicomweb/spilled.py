"""A WADO-RS series answer split into its instances as it arrives, the large ones written
to disk: a series larger than what a series read holds in memory is still read once.

`SeriesParts` is fed the answer's bytes in pieces of any size (a multipart/related body,
RFC 2387, as `multipart.split_related` reads it whole). Each part (a stored file, exactly
as sent) is kept in memory while the parts held there stay within `most` bytes; past
that, the part goes on in a file of the source's spool folder (`spool.Spooled`), while
there is room there. Memory then holds `most` bytes and a piece, whatever the answer's
size. An answer that ends before its closing delimiter is `Truncated`.
"""

from __future__ import annotations

import os

from migrator.ends.dicomweb.multipart import Truncated, part_length
from migrator.ends.spool import Spooled, SpoolFolder, write_all

__all__ = ["NoRoom", "SeriesParts"]

# Bytes a part's headers may take.
HEAD_MOST = 64 * 1024


class NoRoom(Exception):
    """A part would go past the memory budget and the spool folder cannot take it."""


class SeriesParts:
    """The parts of one multipart answer, in order (`feed`, then `finish`)."""

    def __init__(self, boundary: str, most: int, spool: SpoolFolder | None) -> None:
        self._delimiter = b"--" + boundary.encode("latin-1")
        # The delimiter after a part's body: its CRLF belongs to it (RFC 2046).
        self._next = b"\r\n" + self._delimiter
        self._most = most
        self._spool = spool
        self._buffer = bytearray()
        self._state = "preamble"
        self.parts: list[bytes | Spooled] = []
        self._held = 0  # bytes of the parts kept in memory
        self._left: int | None = None  # bytes the part being read announced, still to come
        self._memory: bytearray | None = None
        self._file: int | None = None
        self._path = ""

    def feed(self, data: bytes) -> None:
        """The answer's next bytes. Raises `Truncated` (malformed) or `NoRoom`."""
        self._buffer += data
        while self._step():
            pass

    @property
    def on_disk(self) -> bool:
        """Whether the part being read goes to a file (feeding it then writes to disk)."""
        return self._file is not None

    def finish(self) -> list[bytes | Spooled]:
        """The parts, once the answer ended; `Truncated` if it ended early."""
        if self._state != "done":
            raise Truncated("the answer ended before its closing delimiter")
        return self.parts

    def abandon(self) -> None:
        """Remove the files written (the answer is not used)."""
        if self._file is not None:
            os.close(self._file)
            self._file = None
            SpoolFolder.discard(Spooled(self._path))
        for part in self.parts:
            SpoolFolder.discard(part)
        self.parts = []

    # -- the state machine -------------------------------------------------------------

    def _step(self) -> bool:
        """Consume what the buffer allows; whether there may be more to do."""
        buffer, state = self._buffer, self._state
        if state == "preamble":
            at = buffer.find(self._delimiter)
            if at < 0:
                del buffer[: max(len(buffer) - len(self._delimiter), 0)]
                return False
            del buffer[: at + len(self._delimiter)]
            self._state = "delimited"
            return True
        if state == "delimited":
            if len(buffer) < 2:
                return False
            self._state = "done" if buffer[:2] == b"--" else "headers"
            return self._state != "done"
        if state == "headers":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > HEAD_MOST:
                    raise Truncated("a part's headers do not end")
                return False
            self._left = part_length(bytes(buffer[:end]))
            del buffer[: end + 4]
            self._begin_part()
            self._state = "body"
            return True
        if state == "body":
            return self._body()
        if state == "closing":
            if len(buffer) < len(self._next):
                return False
            if buffer[: len(self._next)] != self._next:
                raise Truncated("a part announced its length and was not followed by a delimiter")
            del buffer[: len(self._next)]
            self._state = "delimited"
            return True
        buffer.clear()  # "done": the epilogue is ignored
        return False

    def _body(self) -> bool:
        buffer = self._buffer
        if self._left is not None:
            take = min(self._left, len(buffer))
            self._write(buffer[:take])
            del buffer[:take]
            self._left -= take
            if self._left:
                return False
            self._end_part()
            self._state = "closing"
            return True
        at = buffer.find(self._next)
        if at < 0:
            # All but what could be the start of the delimiter belongs to the part.
            keep = len(self._next) - 1
            if len(buffer) > keep:
                self._write(buffer[: len(buffer) - keep])
                del buffer[: len(buffer) - keep]
            return False
        self._write(buffer[:at])
        del buffer[: at + len(self._next)]
        self._end_part()
        self._state = "delimited"
        return True

    # -- where a part goes ---------------------------------------------------------------

    def _begin_part(self) -> None:
        if self._left is not None and self._held + self._left > self._most:
            self._to_file(self._left)
        else:
            self._memory = bytearray()

    def _write(self, data: bytearray) -> None:
        if self._memory is not None:
            self._memory += data
            if self._held + len(self._memory) <= self._most:
                return
            held, self._memory = self._memory, None
            self._to_file(len(held))
            self._write(held)
            return
        assert self._file is not None
        write_all(self._file, data)

    def _to_file(self, size: int) -> None:
        """Go on with the part in a file (`size`: its bytes as far as known)."""
        if self._spool is None or not self._spool.room(size):
            raise NoRoom(f"a part of {size} bytes is past {self._most} bytes held in memory")
        path = self._spool.new_path()
        if path is None:
            raise NoRoom("the spool folder is closed")
        self._path = path
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def _end_part(self) -> None:
        if self._memory is not None:
            self.parts.append(bytes(self._memory))
            self._held += len(self._memory)
            self._memory = None
            return
        assert self._file is not None
        os.close(self._file)
        self._file = None
        self.parts.append(Spooled(self._path))
