"""Store associations on the event loop: C-STORE and C-ECHO over asyncio streams.

A target's associations only send requests and read their responses, one at a time: this
needs none of pynetdicom's machinery (a reactor thread per association, a thread-pool
call and two thread switches per message, about 1 ms of CPU a store). A `Link` writes the
PDUs (`migrator.ends.dimse.pdu`, byte for byte pynetdicom's) on its stream and reads the
answer's PDUs in the event loop; a C-STORE costs a few tens of microseconds of CPU. The
association is negotiated the same way (same contexts, same implementation identifiers);
a rejection, an abort or a peer that does not answer is classified by
`errors.verdict_for_association`, as for pynetdicom's associations.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from migrator.ends.dimse import pdu
from migrator.ends.dimse.peer import QUICK_CUT, AssociationPool, CutShort, Peer
from migrator.errors import Kind, TransferError, Verdict, verdict_for_association

__all__ = ["Link", "LinkPool", "LinkSettings", "open_link"]

_message_ids = itertools.count(1)
# Seconds since its last response within which an association is taken as it is.
_FRESH = 0.05
# Bytes written to the stream before waiting for it to drain.
_WRITE_SIZE = 1 << 20


@dataclass(frozen=True)
class LinkSettings:
    """Timeouts of one association: TCP connect, the peer's answer to the request (ACSE),
    a response to a message (DIMSE)."""

    connect: float
    acse: float
    dimse: float


class _Cut(Exception):
    """The peer ended the association (A-ABORT, A-RELEASE-RQ, or the connection)."""


@dataclass(eq=False)
class Link:
    """An established association: the contexts the peer accepted (context ID -> (SOP
    class, transfer syntax)), the largest P-DATA-TF it takes (0: any), the keys proposed
    (set by the opener)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    side: str
    accepted: dict[int, tuple[str, str]]
    max_length: int
    rejected: set[tuple[str, str]] = field(default_factory=set)
    proposed: set[tuple[str, str]] = field(default_factory=set)
    is_established: bool = True
    # When the last response was read (monotonic seconds).
    answered: float = field(default_factory=time.monotonic)

    def context_id(self, sop_class: str, transfer_syntax: str) -> int | None:
        """The accepted context carrying `sop_class` in `transfer_syntax`, if any."""
        for context_id, accepted in self.accepted.items():
            if accepted == (sop_class, transfer_syntax):
                return context_id
        return None

    def syntaxes(self, sop_class: str) -> dict[str, int]:
        """The transfer syntaxes accepted for `sop_class` -> their context ID."""
        return {ts: cid for cid, (sc, ts) in self.accepted.items() if sc == sop_class}

    def usable(self, *, look: bool = True) -> bool:
        """Whether the association is up and idle: nothing came from the peer since the
        last response (a storage SCP sends nothing unasked: an A-ABORT, an A-RELEASE-RQ
        or a closed connection all end it). What the event loop has not read yet is
        looked for on the socket (`look`) when the association was idle for a while: a
        system call that, busy, costs the loop a wait for the GIL (~0.1 ms a store),
        and in the moment since the last response a peer that ends it is seen anyway
        (the store then fails retryable)."""
        if not self.is_established or self.reader.at_eof() or self.writer.is_closing():
            return False
        if not look or time.monotonic() - self.answered < _FRESH:
            return True
        sock = self.writer.get_extra_info("socket")
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    async def store(self, context_id: int, sop_class: str, sop_uid: str, dataset: memoryview,
                    timeout: float) -> int | None:  # fmt: skip
        """C-STORE one dataset (encoded in the context's transfer syntax): the response's
        status, None when the association ended first (it is then down)."""
        msg_id = next(_message_ids) % 65536
        command = pdu.store_rq_command(msg_id, sop_class, sop_uid)
        return await self._exchange(
            lambda: self._write(context_id, command, dataset), msg_id, pdu.C_STORE_RSP, timeout
        )

    async def store_stream(self, context_id: int, sop_class: str, sop_uid: str,
                           first: memoryview, rest: AsyncIterator[bytes], length: int,
                           timeout: float) -> int | None:  # fmt: skip
        """C-STORE a dataset of `length` bytes that comes in chunks (`first`, then those
        of `rest`), each written as it comes: what is held is a chunk, not the dataset.
        A source that fails (a TransferError from `rest`, which holds its last chunk back
        until the source checked out) aborts the association before the dataset's last
        fragment, so that the peer stores nothing; the error is raised. Otherwise as
        `store`."""
        msg_id = next(_message_ids) % 65536
        command = pdu.store_rq_command(msg_id, sop_class, sop_uid)

        async def write() -> None:
            self.writer.write(b"".join(pdu.pdata_parts(context_id, command, None, self.max_length)))
            sent, chunk = 0, first
            while True:
                if len(chunk):
                    parts = pdu.dataset_parts(context_id, chunk, sent, length, self.max_length)
                    self.writer.write(b"".join(parts))
                    sent += len(chunk)
                    async with asyncio.timeout(timeout):
                        await self.writer.drain()
                if sent >= length:
                    break
                try:
                    chunk = memoryview(await anext(rest))
                except StopAsyncIteration:
                    reason = f"{self.side}: the source ended after {sent} of {length} bytes"
                    raise TransferError(Verdict(Kind.RETRYABLE, reason)) from None
            async for _ in rest:  # the source's last checks, once its last chunk went
                raise TransferError(Verdict(Kind.RETRYABLE, f"{self.side}: more than announced"))

        return await self._exchange(write, msg_id, pdu.C_STORE_RSP, timeout)

    async def echo(self, timeout: float) -> int | None:
        """C-ECHO over the Verification context (None: no answer, the association ended)."""
        context_id = self.context_id(pdu.VERIFICATION, pdu.IMPLICIT_LE)
        if context_id is None:
            return None
        msg_id = next(_message_ids) % 65536
        command = pdu.echo_rq_command(msg_id)
        return await self._exchange(
            lambda: self._write(context_id, command, None), msg_id, pdu.C_ECHO_RSP, timeout
        )

    async def _write(self, context_id: int, command: bytes, dataset: memoryview | None) -> None:
        """Write one message: its command, then its dataset (None: none), in PDUs."""
        chunk: list[bytes | memoryview] = []
        size = 0
        for part in pdu.pdata_parts(context_id, command, dataset, self.max_length):
            chunk.append(part)
            size += len(part)
            if size >= _WRITE_SIZE:
                self.writer.write(b"".join(chunk))
                chunk, size = [], 0
                await self.writer.drain()
        if chunk:
            self.writer.write(b"".join(chunk))

    async def _exchange(self, write: Callable[[], Awaitable[None]], msg_id: int, expected: int,
                        timeout: float) -> int | None:  # fmt: skip
        """Send a request with `write`, then read its response: the status, None when
        the association ended (or was given up) on the way."""
        try:
            await write()
            async with asyncio.timeout(timeout):
                await self.writer.drain()
                fields = pdu.command_fields(await self._read_command())
            self.answered = time.monotonic()
        except TransferError:
            # The source failed while its dataset was written: the peer must never take
            # what it received for the whole of it.
            self.abort()
            raise
        except (_Cut, OSError, asyncio.IncompleteReadError):
            self._close()
            return None
        except TimeoutError:
            # No answer within the DIMSE timeout: the association is given up (pynetdicom
            # aborts it too), and the store is retried on another.
            self.abort()
            return None
        return self._status(fields, msg_id, expected)

    def _status(self, fields: dict[int, int], msg_id: int, expected: int) -> int:
        """The status of the response `fields` to request `msg_id`; a response that is
        not the one expected aborts the association (retryable)."""
        if fields.get(0x0100) != expected or fields.get(0x0120) != msg_id or 0x0900 not in fields:
            self.abort()
            reason = f"{self.side}: the peer's response does not match the request"
            raise TransferError(Verdict(Kind.RETRYABLE, reason))
        return fields[0x0900]

    async def _read_command(self) -> bytes:
        """The command set of the next DIMSE message from the peer (its PDVs joined)."""
        parts: list[bytes] = []
        while True:
            kind, body = await _read_pdu(self.reader)
            if kind != pdu.P_DATA:
                if kind == pdu.RELEASE_RQ:
                    with contextlib.suppress(OSError):
                        self.writer.write(_RELEASE_RP)
                raise _Cut
            pos = 0
            while pos + 6 <= len(body):
                (length,) = struct.unpack_from(">I", body, pos)
                control = body[pos + 5]
                if control & 0x01:
                    parts.append(body[pos + 6 : pos + 4 + length])
                    if control & 0x02:
                        return b"".join(parts)
                pos += 4 + length

    async def release(self, timeout: float = 5.0) -> None:
        """A-RELEASE-RQ, then the peer's A-RELEASE-RP (an abort when it does not come)."""
        if not self.usable():
            self.abort()
            return
        try:
            self.writer.write(_RELEASE_RQ)
            async with asyncio.timeout(timeout):
                while (await _read_pdu(self.reader))[0] != pdu.RELEASE_RP:
                    pass
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            self.abort()
            return
        self._close()

    def abort(self) -> None:
        """A-ABORT (service user), then the connection closed."""
        if self.is_established:
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write(_ABORT)
        self._close()

    def _close(self) -> None:
        self.is_established = False
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


_RELEASE_RQ = struct.pack(">BBII", pdu.RELEASE_RQ, 0, 4, 0)
_RELEASE_RP = struct.pack(">BBII", pdu.RELEASE_RP, 0, 4, 0)
_ABORT = struct.pack(">BBIBBBB", pdu.ABORT, 0, 4, 0, 0, 0, 0)


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(6)
    kind, _, length = struct.unpack(">BBI", header)
    return kind, await reader.readexactly(length)


async def open_link(
    peer: Peer, side: str, contexts: list[tuple[str, list[str]]], timeouts: LinkSettings
) -> Link:
    """An established association with `peer` proposing `contexts` (abstract syntax,
    transfer syntaxes); raises TransferError with the classified reason otherwise."""
    started = time.monotonic()
    try:
        return await _open_link(peer, side, contexts, timeouts)
    except CutShort:
        # A peer that rejects and closes at once can have its A-ASSOCIATE-RJ lost with the
        # connection: asking once more learns the real answer (`peer.Connector.associate`).
        if time.monotonic() - started > QUICK_CUT:
            raise
        await asyncio.sleep(0.05)
        return await _open_link(peer, side, contexts, timeouts)


async def _open_link(
    peer: Peer, side: str, contexts: list[tuple[str, list[str]]], timeouts: LinkSettings
) -> Link:
    def refused(rejection: tuple[int, int, int] | None, connected: bool) -> Verdict:
        return verdict_for_association(rejection, side=side, peer=peer.display, connected=connected)

    try:
        async with asyncio.timeout(timeouts.connect):
            reader, writer = await asyncio.open_connection(peer.host, peer.port, limit=1 << 20)
    except (OSError, TimeoutError):
        raise TransferError(refused(None, False)) from None
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(AttributeError, OSError):
        # Nagle off: a message is a command PDU then data PDUs (`peer.no_delay`).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        writer.write(pdu.associate_rq(peer.called, peer.calling, contexts))
        async with asyncio.timeout(timeouts.acse):
            kind, body = await _read_pdu(reader)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        writer.close()
        if isinstance(exc, TimeoutError):
            raise TransferError(refused(None, True)) from None
        raise CutShort(refused(None, True)) from None
    except BaseException:
        # Cancelled (the pool closed while this one was being opened).
        writer.close()
        raise
    if kind == pdu.ASSOCIATE_RJ and len(body) >= 4:
        writer.close()
        raise TransferError(refused((body[1], body[2], body[3]), True))
    if kind != pdu.ASSOCIATE_AC:
        writer.close()
        raise CutShort(refused(None, True))
    answer = pdu.parse_accept(body)
    accepted: dict[int, tuple[str, str]] = {}
    rejected: set[tuple[str, str]] = set()
    for index, (abstract, syntaxes) in enumerate(contexts):
        ts = answer.contexts.get(2 * index + 1)
        if ts is None:
            rejected.add((abstract, syntaxes[0]))
        else:
            accepted[2 * index + 1] = (abstract, ts)
    link = Link(reader, writer, side, accepted, answer.max_length, rejected)
    if not accepted:
        link.abort()
        raise TransferError(
            Verdict(
                Kind.PERMANENT,
                f"{side} {peer.display}: the peer accepted none of the presentation "
                "contexts proposed",
            )
        )
    return link


class _Opener:
    """What `AssociationPool` reads of its connector: the side and the peer."""

    def __init__(self, peer: Peer, role: str) -> None:
        self.peer = peer
        self.role = role


class LinkPool(AssociationPool):
    """`AssociationPool` of `Link`s: the same reuse, limit and growth (one more opened
    in the background, the number kept when the peer leaves it unanswered), opened and
    ended on the event loop."""

    def __init__(self, peer: Peer, role: str, opener: object, size: int) -> None:
        super().__init__(_Opener(peer, role), opener, size)  # type: ignore[arg-type]

    async def _open(self, extra: bool) -> Link:
        return await self.opener(extra)  # type: ignore[misc, no-any-return]

    def _usable(self, assoc: Link) -> bool:  # type: ignore[override]
        return assoc.usable()

    async def _abort(self, assoc: Link) -> None:  # type: ignore[override]
        assoc.abort()

    async def _release(self, assoc: Link) -> None:  # type: ignore[override]
        await assoc.release()

    def _interrupt(self) -> None:
        # The opening in the background is a task: cancelling it ends its connection.
        if self.growth is not None:
            self.growth.cancel()

    async def aclose(self) -> None:
        """Release every idle association; one being opened is cut off."""
        growth = self.growth
        await super().aclose()
        if growth is not None:
            await asyncio.wait([growth])
            # The opening ended by the cancellation, not by the peer.
            self.cut = False
