"""Instances arriving by C-STORE: on a C-GET's own association, or at our storage SCP
(the C-MOVE destination).

Arrivals are matched by SOP Instance UID to the retrievals waiting for them; an instance
nobody waits for (a late arrival of a retrieval given up) is acknowledged and dropped, so
that memory holds only what a waiting fetch will take. The bytes kept are the dataset as
received, behind a file meta naming its transfer syntax (pynetdicom's
`Event.encoded_dataset`): a Part-10 file, the pixel data as the peer sent them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from migrator.ends.dimse.peer import no_delay
from migrator.ends.series import SERIES_BUDGET

__all__ = ["Arrivals", "StorageSCP"]

log = logging.getLogger("migrator")

# C-STORE statuses our side answers.
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000


class Arrivals:
    """Instances received for the retrievals under way, by SOP Instance UID (thread-safe:
    pynetdicom calls `on_store` from its association threads)."""

    def __init__(self, most: int = SERIES_BUDGET) -> None:
        # Bytes of one series retrieved whole kept at most (the rest is retrieved alone).
        self.most = most
        self.lock = threading.Lock()
        self.expected: dict[str, int] = {}
        self.received: dict[str, bytes] = {}
        # Series moved whole: what arrived of each, by SOP Instance UID.
        self.series: dict[str, dict[str, bytes]] = {}

    def expect_series(self, series_uid: str) -> None:
        """Keep every instance of this series that arrives (up to `most` bytes)."""
        with self.lock:
            self.series.setdefault(series_uid, {})

    def take_series(self, series_uid: str) -> dict[str, bytes]:
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

    def take(self, sop_uids: list[str]) -> dict[str, bytes]:
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
        (`bucket` set on it) every instance is kept there, up to `most` bytes."""
        bucket = getattr(event.assoc, "bucket", None)
        if bucket is not None:
            return _into_bucket(event, bucket, self.most)
        try:
            uid = str(event.request.AffectedSOPInstanceUID)
            with self.lock:
                wanted = uid in self.expected
                moving = bool(self.series)
            if wanted:
                data = event.encoded_dataset()
                with self.lock:
                    if uid in self.expected:
                        self.received[uid] = data
            elif moving:
                self._into_series(event, uid)
        except Exception as exc:
            log.warning("could not take a received instance: %s", exc)
            return CANNOT_UNDERSTAND
        return SUCCESS

    def _into_series(self, event: Any, uid: str) -> None:
        """Keep an arrival of a series moved whole (the move's association is the peer's,
        so the series is read from the dataset itself)."""
        series_uid = str(event.dataset.get("SeriesInstanceUID", ""))
        with self.lock:
            bucket = self.series.get(series_uid)
        if bucket is None:
            return
        data = event.encoded_dataset()
        with self.lock:
            if sum(len(v) for v in bucket.values()) + len(data) <= self.most:
                bucket[uid] = data


def _into_bucket(event: Any, bucket: dict[str, bytes], most: int) -> int:
    try:
        data = event.encoded_dataset()
        if sum(len(v) for v in bucket.values()) + len(data) <= most:
            bucket[str(event.request.AffectedSOPInstanceUID)] = data
    except Exception as exc:
        log.warning("could not take a received instance: %s", exc)
        return CANNOT_UNDERSTAND
    return SUCCESS


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
