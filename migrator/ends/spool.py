"""Instances kept on disk on their way from a source to a target: a received instance too
large to hold in memory, or one a series retrieval brought before its row asks for it.

A source that receives whole instances it did not ask for one by one (a DIMSE peer's
C-GET or C-MOVE, a WADO-RS series answer) writes the large ones into its `SpoolFolder`, a
folder of the temporary folder named with the process ID; each file there is a Part-10
file (`Spooled`) that its row streams to the target (`streams.open_file_chunks`) and
removes. A folder left by a run that was killed is removed by the next one
(`sweep_spool_folders`). What would leave the temporary folder's file system with less
than `SPOOL_FREE` free is not kept (its row retrieves it alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass

from migrator.ends.streams import Chunks, open_file_chunks
from migrator.errors import Kind, TransferError, Verdict

__all__ = [
    "SPOOL_FREE",
    "SPOOL_PREFIX",
    "SpoolFolder",
    "Spooled",
    "copy_range",
    "open_spooled",
    "sweep_spool_folders",
    "take_spooled",
    "write_all",
]

log = logging.getLogger("migrator")

# The spool folders' names in the temporary folder: this, the owner's process ID, "-".
SPOOL_PREFIX = "migrator-spool-"
# Free bytes the temporary folder's file system keeps: an instance that would leave less
# is not kept on disk.
SPOOL_FREE = 1 << 30


@dataclass(frozen=True)
class Spooled:
    """An instance kept in a file of a spool folder: whoever takes it reads it and
    removes the file (`SpoolFolder.discard` when it is not wanted)."""

    path: str


class SpoolFolder:
    """One source's folder of spooled instances, made when the first one is kept, removed
    at `close` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folder: str | None = None
        self._names = itertools.count()
        self._closed = False

    def new_path(self) -> str | None:
        """A path for one more instance (None: closed)."""
        with self._lock:
            if self._closed:
                return None
            if self._folder is None:
                # The process ID in the name: a run killed before removing its folder is
                # found out by the next one (`sweep_spool_folders`).
                self._folder = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")
            return os.path.join(self._folder, f"{next(self._names)}.dcm")

    def room(self, size: int) -> bool:
        """Whether `size` bytes more leave `SPOOL_FREE` free."""
        try:
            free = shutil.disk_usage(self._folder or tempfile.gettempdir()).free
        except OSError:
            return False
        return free - size >= SPOOL_FREE

    @staticmethod
    def discard(data: object) -> None:
        """Forget an instance nobody takes: a `Spooled` one's file is removed."""
        if isinstance(data, Spooled):
            with contextlib.suppress(OSError):
                os.unlink(data.path)

    def close(self) -> None:
        """Remove the folder and what is left in it; nothing is kept after."""
        with self._lock:
            folder, self._folder, self._closed = self._folder, None, True
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def sweep_spool_folders(parent: str | None = None) -> int:
    """Remove the spool folders that processes which ended without removing them (killed)
    left in `parent` (the temporary folder); how many (logged when any). A folder whose
    process still runs, or whose name does not say, is left alone."""
    removed = 0
    try:
        entries = list(os.scandir(parent or tempfile.gettempdir()))
    except OSError:
        return 0
    for entry in entries:
        owner = _SPOOL_NAME.fullmatch(entry.name)
        if owner is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(owner.group(1))
        if pid == os.getpid() or _running(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d spool folders of runs that were killed", removed)
    return removed


_SPOOL_NAME = re.compile(re.escape(SPOOL_PREFIX) + r"(\d+)-\w+")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: it exists
    return True


def copy_range(source: int, out: int, offset: int, size: int) -> None:
    """Append `size` bytes of file descriptor `source` from `offset` to descriptor `out`
    (at its own offset), in the kernel where it can (``copy_file_range``), else through a
    small buffer."""
    done = 0
    try:
        while done < size:
            copied = os.copy_file_range(source, out, size - done, offset + done)
            if copied == 0:
                break
            done += copied
    except OSError:
        pass  # a file system that cannot: the rest below
    while done < size:
        block = os.pread(source, min(size - done, 1 << 20), offset + done)
        if not block:
            raise OSError(f"the data ended after {done} of {size} bytes")
        write_all(out, block)
        done += len(block)


def write_all(out: int, data: bytes | bytearray) -> None:
    """Write all of `data` to file descriptor `out` (``os.write`` may write a part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(out, view) :]


async def take_spooled(data: Spooled) -> bytes:
    """The bytes of a spooled instance, whose file is then removed."""
    return await asyncio.to_thread(_take_file, data.path)


async def open_spooled(data: Spooled) -> bytes | Chunks:
    """A spooled instance in chunks read from its file (`streams.open_file_chunks`), or
    its bytes when it is too small to stream; the file is removed either way (a stream
    reads it through its open descriptor)."""
    try:
        chunks = await asyncio.to_thread(open_file_chunks, data.path)
        if chunks is None:
            return await take_spooled(data)
    except OSError as exc:
        raise _unreadable(exc) from None
    finally:
        SpoolFolder.discard(data)
    return chunks


def _take_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise _unreadable(exc) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _unreadable(exc: OSError) -> TransferError:
    return TransferError(Verdict(Kind.RETRYABLE, f"cannot read a kept instance: {exc}"))
