"""A DIMSE peer: its URL, our AE, associations classified into the one error taxonomy,
and a pool of associations reused across transfers.

pynetdicom is blocking: every network call runs on the end's own thread pool (sized for
the pool of associations, so that the event loop's default executor is not starved), and
one association is only ever used by one call at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

from migrator.config import Settings
from migrator.errors import (
    FatalError,
    Kind,
    TransferError,
    UsageError,
    Verdict,
    verdict_for_association,
)

if TYPE_CHECKING:
    # pynetdicom (and pydicom with it) is imported by the operations that use it: a run
    # that only stores files goes without (`migrator.ends.dimse.link`).
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

__all__ = ["AssociationPool", "Connector", "Peer", "parse_dicom_url"]

log = logging.getLogger("migrator")
# pynetdicom logs every association at INFO and every rejection at ERROR: our own
# messages say what matters, once.
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

T = TypeVar("T")

# The DICOM port when a URL gives none.
DEFAULT_PORT = 104
# Associations one end keeps open at most: peers serve few at once (Orthanc 4 by
# default, one thread each for as long as it is open: a fifth is accepted but its
# requests wait for a thread), and each costs a thread here; more transfers than this
# wait for one.
MAX_ASSOCIATIONS = 4
# Seconds an association beyond the first waits for the peer's answer.
EXTRA_WAIT = 3.0
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


@dataclass(frozen=True)
class Peer:
    """Where a DIMSE peer listens, the AE title it answers to (called), and ours."""

    called: str
    host: str
    port: int
    calling: str

    @property
    def display(self) -> str:
        """The URL as shown and stored: ``dicom://AET@host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"dicom://{self.called}@{host}:{self.port}"


def parse_dicom_url(url: str, role: str, calling: str) -> Peer:
    """Parse ``dicom://CALLED_AE@host:port`` (the userinfo is the peer's AE title, not
    credentials); raise UsageError with one line on anything else."""
    raw = url.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() != "dicom":
        raise UsageError(f"{role} URL {raw!r}: a DICOM peer is dicom://AET@host:port")
    rest = rest.rstrip("/")
    called, at, hostport = rest.rpartition("@")
    called = unquote(called).strip()
    if not at or not called:
        raise UsageError(f"{role} URL {raw!r} names no AE title: dicom://AET@host:port")
    if not _AET_RE.match(called):
        raise UsageError(f"{role} URL {raw!r}: the AE title must be 1 to 16 printable characters")
    if "/" in hostport or "?" in hostport or "#" in hostport:
        raise UsageError(f"{role} URL {raw!r}: nothing may follow host:port")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d*))?|([A-Za-z0-9._\-]+)(?::(\d*))?", hostport)
    if not match:
        raise UsageError(f"{role} URL {raw!r} has no valid host")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    port = int(port_text) if port_text else DEFAULT_PORT
    if not 0 < port < 65536:
        raise UsageError(f"{role} URL {raw!r}: the port must be between 1 and 65535")
    return Peer(called, host, port, calling.strip())


def _make_ae(calling: str, settings: Settings, acse_timeout: float) -> AE:
    from pynetdicom import AE, _config

    # pynetdicom's standard event handlers write every message to its log (silenced
    # above) and copy each received dataset whole to say whether it has one: a copy of
    # every instance a retrieval receives, which the source's streaming must not have.
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=calling)
    ae.connection_timeout = settings.connect_timeout
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = settings.timeout
    ae.network_timeout = settings.timeout
    # We accept PDUs of any size: fewer, larger P-DATA from the peer.
    ae.maximum_pdu_size = 0
    return ae


# An association cut before any answer within this many seconds was cut by the peer, not
# given up by our ACSE timeout.
QUICK_CUT = 1.0


class CutShort(TransferError):
    """The peer closed the connection before answering the association request."""


class Connector:
    """Opens associations with one peer, on the end's own threads."""

    def __init__(self, peer: Peer, settings: Settings, role: str, threads: int) -> None:
        self.peer = peer
        self.role = role
        self.ae = _make_ae(peer.calling, settings, settings.connect_timeout + 20)
        # An association beyond the first: a peer that serves fewer at once leaves it
        # unanswered, and the run must not wait long to learn it.
        self.extra_ae = _make_ae(peer.calling, settings, min(EXTRA_WAIT, settings.connect_timeout))
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix=f"dimse-{role}")
        # Associations connected and waiting for the peer's answer.
        self.pending: set[Association] = set()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call on the end's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def associate(
        self,
        contexts: list[PresentationContext],
        *,
        roles: list[Any] | None = None,
        handlers: list[Any] | None = None,
        extra: bool = False,
    ) -> Association:
        """An established association proposing `contexts` (blocking); `extra`: one
        beyond the first, given up sooner. Raises TransferError with the classified
        reason when it cannot be established."""
        started = time.monotonic()
        try:
            return self._associate(contexts, roles=roles, handlers=handlers, extra=extra)
        except CutShort:
            # A peer that rejects and closes at once can have its A-ASSOCIATE-RJ lost with
            # the connection (seen with storescp --refuse on a loaded machine): the cut
            # looks like an abort. Asking once more learns the real answer; a peer that
            # merely timed out is not asked twice.
            if extra or time.monotonic() - started > QUICK_CUT:
                raise
            time.sleep(0.05)
            return self._associate(contexts, roles=roles, handlers=handlers, extra=extra)

    def _associate(
        self,
        contexts: list[PresentationContext],
        *,
        roles: list[Any] | None,
        handlers: list[Any] | None,
        extra: bool,
    ) -> Association:
        from pynetdicom import evt

        rejection: list[tuple[int, int, int]] = []
        answered: list[bool] = []

        def on_recv(event: Any) -> None:
            primitive = event.primitive
            result = getattr(primitive, "result", None)
            if result in (1, 2):
                rejection.append((result, primitive.result_source, primitive.diagnostic))
            elif result == 0:
                answered.append(True)

        connected: list[bool] = []

        def on_open(event: Any) -> None:
            connected.append(True)
            self.pending.add(event.assoc)
            no_delay(event)

        ae = self.extra_ae if extra else self.ae
        assoc = ae.associate(
            self.peer.host,
            self.peer.port,
            contexts=contexts,
            ae_title=self.peer.called,
            ext_neg=roles,
            evt_handlers=[
                (evt.EVT_ACSE_RECV, on_recv),
                (evt.EVT_CONN_OPEN, on_open),
                *(handlers or []),
            ],
        )
        self.pending.discard(assoc)
        if assoc.is_established:
            return assoc
        verdict = verdict_for_association(
            rejection[0] if rejection else None,
            side=self.role,
            peer=self.peer.display,
            connected=bool(connected),
        )
        if answered and not assoc.accepted_contexts:
            verdict = Verdict(
                Kind.PERMANENT,
                f"{self.role} {self.peer.display}: the peer accepted none of the presentation "
                "contexts proposed",
            )
        if connected and not answered and not rejection:
            raise CutShort(verdict)
        raise TransferError(verdict)

    def interrupt(self) -> None:
        """Cut off the associations waiting for the peer's answer: their connection is
        shut down, and pynetdicom's own thread then ends the opening as failed."""
        for assoc in list(self.pending):
            with contextlib.suppress(AttributeError, OSError):
                assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop the threads (after every association was released)."""
        self.executor.shutdown(wait=False, cancel_futures=True)


class AssociationPool:
    """Associations with one peer, one taken per operation and given back after it: a
    worker reuses the association of its last transfer, and at most `size` are open.

    An association that failed (aborted, timed out, released by the peer) is dropped and a
    new one opened by the next operation. A peer that serves fewer associations at once
    than we open (DCMTK's storescp serves one) leaves the extra one unanswered: the pool
    then keeps the number it has (an extra association waits `EXTRA_WAIT` seconds at most,
    opened in the background while operations go on over those open) and operations wait
    for one of them. `opener(extra)` opens one (blocking).
    """

    def __init__(
        self, connector: Connector, opener: Callable[[bool], Association], size: int
    ) -> None:
        self.connector = connector
        self.opener = opener
        self.size = size
        self.open = 0
        self.idle: list[Association] = []
        # Associations reserved (open or being opened), and those open.
        self.live = 0
        self.changed = asyncio.Condition()
        # The first association being opened by an operation, one more being opened in
        # the background, and a failure of the latter for the next operation.
        self.opening = False
        self.growth: asyncio.Task[None] | None = None
        self.failure: TransferError | None = None
        self.cut = False

    @asynccontextmanager
    async def take(self) -> Any:
        """An established association for one operation (blocking calls go through
        `connector.run`). When the body fails other than by refusing one instance, the
        association is aborted, not reused."""
        assoc = await self._acquire()
        keep = False
        try:
            yield assoc
            keep = True
        except TransferError as exc:
            # A refused or vanished instance leaves the association as good as it was.
            keep = exc.verdict.kind in (Kind.PERMANENT, Kind.VANISHED)
            raise
        finally:
            if not (keep and self._usable(assoc)):
                await self._abort(assoc)
                assoc = None
            async with self.changed:
                if assoc is None:
                    self.open -= 1
                    self.live -= 1
                else:
                    self.idle.append(assoc)
                self.changed.notify()

    async def _acquire(self) -> Association:
        async with self.changed:
            while True:
                if self.failure is not None:
                    failure, self.failure = self.failure, None
                    raise failure
                while self.idle:
                    assoc = self.idle.pop()
                    if self._usable(assoc):
                        return assoc
                    # Ended by the peer while idle: its threads end with it.
                    await self._abort(assoc)
                    self.open -= 1
                    self.live -= 1
                # One opening at a time: the first one a peer leaves unanswered sets the
                # number kept before any other waits for its answer.
                if self.open < self.size and self.growth is None and not self.opening:
                    self.open += 1
                    if self.live == 0:
                        self.opening = True
                        break
                    # One more, opened in the background: this operation takes whichever
                    # association is free first. A peer serving fewer leaves the new one
                    # unanswered for EXTRA_WAIT, and its operations go on meanwhile.
                    self.growth = asyncio.get_running_loop().create_task(self._grow())
                    continue
                await self.changed.wait()
        # The first association: its failure is this operation's.
        try:
            assoc = await self._open(False)
        except BaseException:
            async with self.changed:
                self.open -= 1
                self.opening = False
                self.changed.notify_all()
            raise
        async with self.changed:
            self.live += 1
            self.opening = False
            self.changed.notify_all()
        return assoc

    async def _grow(self) -> None:
        """Open one more association and offer it as idle; when the peer does not answer
        or refuses it, keep the number open (a failure other than that goes to the next
        operation, as it would have gone to the one that asked for it)."""
        try:
            assoc = await self._open(True)
        except TransferError as exc:
            async with self.changed:
                self.open -= 1
                self.growth = None
                if self.cut:
                    # Cut off by `aclose`: says nothing about the peer.
                    self.cut = False
                    self.changed.notify_all()
                    return
                if exc.verdict.kind is Kind.RETRYABLE and self.live > 0:
                    self.size = self.live
                else:
                    self.failure = exc
                self.changed.notify_all()
            log.info(
                "%s %s: one more association failed (%s): %d kept",
                self.connector.role,
                self.connector.peer.display,
                exc.verdict.reason,
                self.size,
            )
            return
        except BaseException:
            async with self.changed:
                self.open -= 1
                self.growth = None
                self.changed.notify_all()
            raise
        async with self.changed:
            self.growth = None
            cut, self.cut = self.cut, False
            if cut:
                self.open -= 1
            else:
                self.live += 1
                self.idle.append(assoc)
            self.changed.notify_all()
        if cut:
            # Opened while the pool was being closed.
            await self._release(assoc)

    async def aclose(self) -> None:
        """Release every idle association (the pool opens new ones if asked again); an
        association still being opened is cut off (it would hold the process's exit
        until the peer's answer or EXTRA_WAIT)."""
        if self.growth is not None:
            self.cut = True
            self._interrupt()
        async with self.changed:
            idle, self.idle = self.idle, []
            self.open -= len(idle)
            self.live -= len(idle)
            self.changed.notify_all()
        for assoc in idle:
            await self._release(assoc)

    # The operations on one association: pynetdicom's, on the connector's threads.

    async def _open(self, extra: bool) -> Any:
        return await self.connector.run(self.opener, extra)

    def _usable(self, assoc: Any) -> bool:
        from migrator.ends.dimse.wire import usable

        return usable(assoc)

    async def _abort(self, assoc: Any) -> None:
        await self.connector.run(_abort, assoc)

    async def _release(self, assoc: Any) -> None:
        await self.connector.run(_release, assoc)

    def _interrupt(self) -> None:
        self.connector.interrupt()


def no_delay(event: Any) -> None:
    """EVT_CONN_OPEN handler: Nagle's algorithm off. A DIMSE message goes out as a command
    PDU then data PDUs; with Nagle on, each small write waits for the peer's delayed ACK
    (40 ms a message on Linux)."""
    # An unusual transport keeps Nagle: slower, not wrong.
    with contextlib.suppress(AttributeError, OSError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _abort(assoc: Association) -> None:
    from migrator.ends.dimse.wire import settle

    settle(assoc)
    if assoc.is_established:
        assoc.abort()


def _release(assoc: Association) -> None:
    from migrator.ends.dimse.wire import settle

    settle(assoc)
    if assoc.is_established:
        try:
            assoc.release()
        except Exception:
            assoc.abort()


def check_association(assoc: Association, side: str, operation: str) -> None:
    """Raise a retryable TransferError when the association went down during an
    operation (pynetdicom then answers an empty status)."""
    if not assoc.is_established:
        raise TransferError(
            Verdict(Kind.RETRYABLE, f"{side} {operation}: association aborted by the peer")
        )


def fatal_from(exc: TransferError) -> FatalError:
    """A preflight's failure as the one line the run stops with."""
    return FatalError(exc.verdict.reason)
