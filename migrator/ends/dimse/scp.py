"""Instances arriving by C-STORE: on a C-GET's own association, or at our storage SCP
(the C-MOVE destination).

Arrivals are matched by SOP Instance UID to the retrievals waiting for them; an instance
nobody waits for (a late arrival of a retrieval given up) is acknowledged and dropped, so
that memory holds only what a waiting fetch will take. What is kept is the dataset as
received, behind a file meta naming its transfer syntax: a Part-10 file, the pixel data
as the peer sent them.

pynetdicom gathers a received dataset in a buffer of its own; `spill_large_arrivals`
makes that buffer a `SpillingBuffer`, which moves to a temporary file past `SPILL_ABOVE`
bytes, so that no arrival is ever whole in memory beyond that. A spilled instance is
kept in a file of the source's spool folder (`spool.Spooled`, its file meta written
first), from which its row streams it to the target; a series retrieval keeps the others
in memory within its budget, the spilled ones on disk while there is room
(`spool.SpoolFolder.room`; what it drops, its row retrieves alone).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from typing import IO, Any

import pynetdicom.dimse_messages
from pydicom import dcmread
from pydicom.tag import Tag
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.transport import ThreadedAssociationServer

from migrator.ends.dimse.peer import no_delay
from migrator.ends.series import SERIES_BUDGET
from migrator.ends.spool import Spooled, SpoolFolder, copy_range
from migrator.ends.streams import STREAM_ABOVE

__all__ = ["SPILL_ABOVE", "Arrivals", "SpillingBuffer", "StorageSCP", "spill_large_arrivals"]

log = logging.getLogger("migrator")

# C-STORE statuses our side answers.
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000


# Bytes of a received dataset held in memory; past them it goes on in a file.
SPILL_ABOVE = STREAM_ABOVE
SERIES = Tag(0x0020, 0x000E)  # SeriesInstanceUID
# The start of a Part-10 file: preamble and prefix.
PREAMBLE = b"\x00" * 128 + b"DICM"


class SpillingBuffer(io.BytesIO):
    """What pynetdicom writes a received dataset into (`spill_large_arrivals`): memory up
    to `SPILL_ABOVE` bytes, then a temporary file (`spilled`) holding all of it. Read a
    spilled one from that file; `getvalue` still answers (with the whole dataset), `read`
    refuses (pydicom decoding it would otherwise see nothing)."""

    def __init__(self, initial: bytes = b"") -> None:
        super().__init__(initial)
        self.spilled: IO[bytes] | None = None

    def write(self, data: Any) -> int:
        if self.spilled is None:
            if self.tell() + len(data) <= SPILL_ABOVE:
                return super().write(data)
            spilled = tempfile.TemporaryFile()  # noqa: SIM115 (closed by `close`)
            with self.getbuffer() as held:  # not copied first: written from where it is
                spilled.write(held)
            self.seek(0)
            self.truncate()
            self.spilled = spilled
        return self.spilled.write(data)

    def getvalue(self) -> bytes:
        if self.spilled is None:
            return super().getvalue()
        self.spilled.flush()
        return os.pread(self.spilled.fileno(), self.spilled.tell(), 0)

    def read(self, size: int | None = -1) -> bytes:
        if self.spilled is not None:
            # What is in memory is no longer the dataset: a reader must not get a part.
            raise io.UnsupportedOperation("a spilled dataset is read from its file")
        return super().read(size)

    def spilled_size(self) -> int:
        """The bytes written to the file (0: not spilled)."""
        return self.spilled.tell() if self.spilled is not None else 0

    def close(self) -> None:
        if self.spilled is not None:
            self.spilled.close()
        super().close()


def spill_large_arrivals() -> None:
    """Have pynetdicom gather each received dataset in a `SpillingBuffer` (process-wide;
    only migrator's DIMSE source receives). pynetdicom has no setting for this: its
    ``STORE_RECV_CHUNKED_DATASET`` writes every arrival to a file, which cost C-GET 13%
    on small instances and 24% on CT slices; the buffer it makes for a message's dataset
    is the `BytesIO` its ``dimse_messages`` module names, which this replaces."""
    pynetdicom.dimse_messages.BytesIO = SpillingBuffer  # type: ignore[attr-defined,misc]


def _spilled(event: Any) -> SpillingBuffer | None:
    """The buffer of an arrival that went to a file, else None."""
    buffer = getattr(event.request, "DataSet", None)
    if isinstance(buffer, SpillingBuffer) and buffer.spilled is not None:
        return buffer
    return None


class Arrivals:
    """Instances received for the retrievals under way, by SOP Instance UID (thread-safe:
    pynetdicom calls `on_store` from its association threads)."""

    def __init__(self, most: int = SERIES_BUDGET) -> None:
        # Bytes of one series retrieved whole kept at most (the rest is retrieved alone).
        self.most = most
        self.lock = threading.Lock()
        self.expected: dict[str, int] = {}
        self.received: dict[str, bytes | Spooled] = {}
        # Series moved whole: what arrived of each, by SOP Instance UID.
        self.series: dict[str, dict[str, bytes | Spooled]] = {}
        # Where large arrivals are kept.
        self.spool = SpoolFolder()
        self.discard = self.spool.discard

    def close(self) -> None:
        """Remove the spool folder and what is left in it; later arrivals are not
        spooled."""
        with self.lock:
            for uid, data in list(self.received.items()):
                if isinstance(data, Spooled):
                    del self.received[uid]
        self.spool.close()

    def _spool(self, event: Any, buffer: SpillingBuffer) -> Spooled | None:
        """A spilled arrival as a Part-10 file of the spool folder: its file meta, then
        the dataset copied from the spill file by the kernel (None: closed)."""
        path = self.spool.new_path()
        if path is None:
            return None
        assert buffer.spilled is not None
        buffer.spilled.flush()
        with open(path, "wb") as out:
            out.write(PREAMBLE + encode_file_meta(event.file_meta))
            out.flush()
            copy_range(buffer.spilled.fileno(), out.fileno(), 0, buffer.spilled_size())
        return Spooled(path)

    def expect_series(self, series_uid: str) -> None:
        """Keep every instance of this series that arrives (up to `most` bytes)."""
        with self.lock:
            self.series.setdefault(series_uid, {})

    def take_series(self, series_uid: str) -> dict[str, bytes | Spooled]:
        """What arrived of a series moved whole; it is no longer expected."""
        with self.lock:
            return self.series.pop(series_uid, {})

    def expect(self, sop_uids: list[str]) -> None:
        """Keep these instances when they arrive."""
        with self.lock:
            for uid in sop_uids:
                self.expected[uid] = self.expected.get(uid, 0) + 1

    def has(self, sop_uid: str) -> bool:
        """Whether this expected instance arrived."""
        with self.lock:
            return sop_uid in self.received

    def take(self, sop_uids: list[str]) -> dict[str, bytes | Spooled]:
        """What arrived of `sop_uids`; they are no longer expected."""
        with self.lock:
            out = {}
            for uid in sop_uids:
                count = self.expected.get(uid, 0) - 1
                if count > 0:
                    self.expected[uid] = count
                    data = self.received.get(uid)
                else:
                    self.expected.pop(uid, None)
                    data = self.received.pop(uid, None)
                if data is not None:
                    out[uid] = data
            return out

    def on_store(self, event: Any) -> int:
        """pynetdicom's EVT_C_STORE handler. On an association retrieving a whole series
        (`bucket` set on it) every instance is kept there (`_keep`)."""
        try:
            uid = str(event.request.AffectedSOPInstanceUID)
            bucket = getattr(event.assoc, "bucket", None)
            if bucket is not None:
                self._into_bucket(event, bucket, uid)
                return SUCCESS
            with self.lock:
                wanted = uid in self.expected
                moving = bool(self.series)
            if wanted:
                self._into_received(event, uid)
            elif moving:
                self._into_series(event, uid)
        except Exception as exc:
            log.warning("could not take a received instance: %s", exc)
            return CANNOT_UNDERSTAND
        finally:
            _release(event)
        return SUCCESS

    def _into_received(self, event: Any, uid: str) -> None:
        """Keep an instance retrieved alone: in memory, or in the spool folder when it
        spilled."""
        buffer = _spilled(event)
        data = event.encoded_dataset() if buffer is None else self._spool(event, buffer)
        with self.lock:
            if uid in self.expected and data is not None:
                data, self.received[uid] = self.received.get(uid), data
        self.discard(data)  # not (or no longer) waited for, or arrived twice

    def _into_series(self, event: Any, uid: str) -> None:
        """Keep an arrival of a series moved whole (the move's association is the peer's,
        so the series is read from the dataset itself)."""
        buffer = _spilled(event)
        if buffer is None:
            series_uid = str(event.dataset.get("SeriesInstanceUID", ""))
            with self.lock:
                bucket = self.series.get(series_uid)
            if bucket is not None:
                self._keep(bucket, uid, event.encoded_dataset())
            return
        spooled = self._spool(event, buffer) if self.spool.room(buffer.spilled_size()) else None
        if spooled is None:
            return
        head = dcmread(spooled.path, stop_before_pixels=True, specific_tags=[SERIES])
        with self.lock:
            bucket = self.series.get(str(head.get("SeriesInstanceUID", "")))
        if bucket is None:
            self.discard(spooled)
            return
        self._keep(bucket, uid, spooled)

    def _into_bucket(self, event: Any, bucket: dict[str, bytes | Spooled], uid: str) -> None:
        """Keep an arrival of a C-GET retrieving a whole series."""
        buffer = _spilled(event)
        if buffer is None:
            self._keep(bucket, uid, event.encoded_dataset())
        elif self.spool.room(buffer.spilled_size()):
            spooled = self._spool(event, buffer)
            if spooled is not None:
                self._keep(bucket, uid, spooled)

    def _keep(self, bucket: dict[str, bytes | Spooled], uid: str, data: bytes | Spooled) -> None:
        """Keep a series' arrival: in memory within `most` bytes, a spooled one on disk
        (what is dropped, its row retrieves alone)."""
        with self.lock:
            held = sum(len(v) for v in bucket.values() if isinstance(v, bytes))
            if isinstance(data, Spooled) or held + len(data) <= self.most:
                data, bucket[uid] = bucket.get(uid), data
        self.discard(data)


def _release(event: Any) -> None:
    """Close an arrival's spill file (pynetdicom only drops the buffer, and a C-GET's
    arrivals live as long as the association's last message)."""
    buffer = _spilled(event)
    if buffer is not None:
        buffer.close()


class StorageSCP:
    """Our storage SCP for C-MOVE: the AE title the peer moves to, listening on `port`
    (0: a free port, then `port` says which)."""

    def __init__(self, aet: str, port: int, arrivals: Arrivals) -> None:
        self.aet = aet
        self.arrivals = arrivals
        ae = AE(ae_title=aet)
        ae.maximum_pdu_size = 0
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
        self.ae = ae
        self.server: ThreadedAssociationServer | None = None
        self.port = port

    def start(self) -> int:
        """Listen (blocking until bound); return the port."""
        server = self.ae.start_server(
            ("0.0.0.0", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self.arrivals.on_store),
                (evt.EVT_CONN_OPEN, no_delay),
            ],
        )
        self.server = server
        self.port = int(server.server_address[1])
        return self.port

    def stop(self) -> None:
        """Stop listening and close the associations."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
