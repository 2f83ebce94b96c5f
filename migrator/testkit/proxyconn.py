"""One proxied connection of :class:`migrator.testkit.proxy.Proxy`.

Split from ``proxy.py`` to keep both modules short: this file holds the byte pumping,
the delayed writers and the HTTP/1.1 request framing; ``proxy.py`` the server, the
bookkeeping and the public API.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from migrator.testkit.faults import DropResponse, Reset, Stall, Status, TruncateResponse

if TYPE_CHECKING:
    from migrator.testkit.proxy import Proxy

__all__ = ["Connection", "Link"]

# With a delay, chunks wait in a queue; beyond this many bytes the source stops being
# read so a fast sender cannot grow the queue without bound.
_QUEUE_HIGH = 8 * 1024 * 1024
_QUEUE_LOW = 2 * 1024 * 1024
# A request head larger than this is not HTTP we understand: stop parsing, just forward.
_MAX_HEAD = 64 * 1024

# Framing states of the client-to-upstream stream.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _OPAQUE = range(6)


class _Flow:
    """Pauses reading of one transport while at least one reason asks for it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons and not self.transport.is_closing():
            self.transport.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons and not self.transport.is_closing():
            self.transport.resume_reading()


class Link:
    """One direction of a link of `rate` bytes per second, shared by every connection:
    chunks leave one after the other, each taking its size / rate seconds."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free_at = 0.0

    def reserve(self, size: int, now: float) -> float:
        """When the last byte of a `size`-byte chunk arriving `now` has left."""
        self.free_at = max(now, self.free_at) + size / self.rate
        return self.free_at


class _Channel:
    """Ordered writer to one transport that adds a fixed delay to every chunk.

    Each chunk is written at its arrival time plus the delay, so many chunks can be "in
    flight" at once, like on a long network path. With a `link`, a chunk first waits
    for its turn on the link's bandwidth.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, delay: float, link: Link | None = None
    ) -> None:
        self.loop = loop
        self.delay = delay
        self.link = link
        self.dest: asyncio.Transport | None = None
        self.source: _Flow | None = None
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False

    def send(self, data: bytes) -> None:
        if self.dest is None or self.dest.is_closing():
            return
        if self.delay <= 0 and self.link is None and not self.queue:
            self.dest.write(data)
            return
        now = self.loop.time()
        sent = now if self.link is None else self.link.reserve(len(data), now)
        self.queue.append((sent + self.delay, data))
        self.queued += len(data)
        if self.queued > _QUEUE_HIGH and self.source is not None:
            self.source.pause("queue")
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        dest = self.dest
        if dest is None or dest.is_closing():
            self.discard()
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            self.queued -= len(data)
            dest.write(data)
        if self.queued < _QUEUE_LOW and self.source is not None:
            self.source.resume("queue")
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)
        elif self.closing:
            dest.close()

    def dest_paused(self, paused: bool) -> None:
        """Follow the destination's write buffer: stop reading the source while it is full."""
        if self.source is not None:
            if paused:
                self.source.pause("dest")
            else:
                self.source.resume("dest")

    def close_after_flush(self) -> None:
        """Close the destination once everything queued has been written."""
        self.closing = True
        if not self.queue and self.dest is not None:
            self.dest.close()

    def discard(self) -> None:
        """Drop whatever is queued."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.conn.on_upstream_data(data)

    def eof_received(self) -> bool:
        self.conn.on_upstream_closed(lost=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.on_upstream_closed(lost=True)

    def pause_writing(self) -> None:
        self.conn.c2u.dest_paused(True)

    def resume_writing(self) -> None:
        self.conn.c2u.dest_paused(False)


class Connection:
    """A client connection, its upstream connection and the request framing between them."""

    def __init__(self, proxy: Proxy, client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.upstream: asyncio.Transport | None = None
        self.client_flow = _Flow(client)
        self.c2u = _Channel(self.loop, proxy.delay, proxy.links[0])
        self.c2u.source = self.client_flow
        self.u2c = _Channel(self.loop, proxy.delay, proxy.links[1])
        self.u2c.dest = client
        self.closed = False
        self.client_open = True
        self.upstream_open = False
        # Request framing on the client-to-upstream stream.
        self.state = _HEAD
        self.remaining = 0
        self.pending = b""
        self.discarding = False
        self.response: bytes | None = None
        self.reset_budget: int | None = None
        self.drop_pending = False
        # Answer bytes still to forward before the client connection is closed.
        self.truncate_budget: int | None = None
        self.stalled = False
        self.stall_head = b""
        self.stall_timer: asyncio.TimerHandle | None = None
        self.held: list[bytes] = []
        # Nothing is read from the client until the upstream connection exists.
        self.client_flow.pause("connect")
        self.connect_task: asyncio.Task[None] | None = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            transport, _ = await self.loop.create_connection(
                lambda: _UpstreamProtocol(self), self.proxy.upstream_host, self.proxy.upstream_port
            )
        except OSError:
            self.abort()
            return
        finally:
            self.connect_task = None
        if self.closed:
            transport.abort()
            return
        assert isinstance(transport, asyncio.Transport)
        self.upstream = transport
        self.upstream_open = True
        self.c2u.dest = transport
        self.u2c.source = _Flow(transport)
        self.client_flow.resume("connect")

    # -- teardown ------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop both sides at once (RST where possible); safe to call repeatedly."""
        self.closed = True
        if self.connect_task is not None:
            self.connect_task.cancel()
        if self.stall_timer is not None:
            self.stall_timer.cancel()
        self.c2u.discard()
        self.u2c.discard()
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()
        self.proxy._forget(self)

    def _maybe_forget(self) -> None:
        if not self.client_open and not self.upstream_open:
            self.closed = True
            self.proxy._forget(self)

    def on_client_closed(self, *, lost: bool) -> None:
        if self.upstream is None:
            self.abort()
            return
        self.c2u.close_after_flush()
        if lost:
            self.client_open = False
            self.u2c.discard()
            self._maybe_forget()

    def on_upstream_closed(self, *, lost: bool) -> None:
        self.u2c.close_after_flush()
        if lost:
            self.upstream_open = False
            self.c2u.discard()
            self._maybe_forget()

    # -- upstream to client ---------------------------------------------------------------

    def on_upstream_data(self, data: bytes) -> None:
        self.proxy.bytes_down += len(data)
        if self.drop_pending:
            # The first answer bytes prove the upstream has processed the request.
            self.abort()
            return
        budget = self.truncate_budget
        if budget is not None:
            if len(data) >= budget:
                self.u2c.send(data[:budget])
                self._truncate_response()
                return
            self.truncate_budget = budget - len(data)
        self.u2c.send(data)

    def _truncate_response(self) -> None:
        # The client gets what was forwarded, then a FIN; the upstream is dropped.
        self.closed = True
        self.truncate_budget = None
        self.c2u.discard()
        if self.upstream is not None:
            self.upstream.abort()
        self.u2c.close_after_flush()

    # -- client to upstream ---------------------------------------------------------------

    def on_client_data(self, data: bytes) -> None:
        self.proxy.bytes_up += len(data)
        if self.stalled:
            self.held.append(data)
        else:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
            self.pending = b""
        pos, n = 0, len(data)
        while pos < n and not self.closed and not self.stalled:
            state = self.state
            if state in (_BODY, _CHUNK_DATA):
                take = min(self.remaining, n - pos)
                self._body(data if take == n else data[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if state == _BODY:
                        self._end_request()
                    else:
                        self.state = _CHUNK_SIZE
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    self._keep(data[pos:])
                    return
                head = data[pos : end + 4]
                pos = end + 4
                self._start_request(head)
            elif state in (_CHUNK_SIZE, _TRAILER):
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self._keep(data[pos:])
                    return
                line = data[pos : eol + 2]
                pos = eol + 2
                self._body(line)
                self._chunk_line(line)
            else:
                self._body(data[pos:] if pos else data)
                return
        if self.stalled and pos < n and not self.closed:
            self.held.append(data[pos:])

    def _keep(self, rest: bytes) -> None:
        if len(rest) > _MAX_HEAD:
            self.state = _OPAQUE
            self._body(rest)
        else:
            self.pending = rest

    def _chunk_line(self, line: bytes) -> None:
        if self.state == _TRAILER:
            if line == b"\r\n":
                self._end_request()
            return
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            self.state = _OPAQUE
            return
        if size == 0:
            self.state = _TRAILER
        else:
            self.state = _CHUNK_DATA
            self.remaining = size + 2  # the chunk's data plus its CRLF

    def _start_request(self, head: bytes) -> None:
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        parts = lines[0].split(b" ")
        method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1") if len(parts) > 1 else "/"
        if "://" in target:  # absolute-form target, as sent to a forward proxy
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path = target.split("?", 1)[0]
        length, chunked, opaque = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip() or b"0")
                except ValueError:
                    opaque = True
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if opaque:
            self.state = _OPAQUE
        elif chunked:
            self.state = _CHUNK_SIZE
        elif length > 0:
            self.state, self.remaining = _BODY, length
        else:
            self.state = _HEAD

        fault = self.proxy._on_request(method, path)
        if isinstance(fault, Reset):
            if fault.after_body_bytes is None:
                self.abort()
                return
            self.reset_budget = fault.after_body_bytes
        elif isinstance(fault, Status):
            self.discarding = True
            self.response = fault.render()
        elif isinstance(fault, DropResponse):
            self.drop_pending = True
        elif isinstance(fault, TruncateResponse):
            self.truncate_budget = fault.after_bytes
        elif isinstance(fault, Stall):
            self.stalled = True
            self.stall_head = head
            self.client_flow.pause("stall")
            self.stall_timer = self.loop.call_later(fault.seconds, self._unstall)
            return
        if not self.discarding:
            self.c2u.send(head)
        if self.state == _HEAD:
            self._end_request()

    def _unstall(self) -> None:
        self.stall_timer = None
        self.stalled = False
        if self.closed:
            return
        self.client_flow.resume("stall")
        self.c2u.send(self.stall_head)
        self.stall_head = b""
        if self.state == _HEAD:
            self._end_request()
        held, self.held = b"".join(self.held), []
        if held:
            self._feed(held)

    def _body(self, chunk: bytes) -> None:
        if self.discarding:
            return
        budget = self.reset_budget
        if budget is not None:
            if len(chunk) >= budget:
                self.c2u.send(chunk[:budget])
                self._reset_mid_body()
                return
            self.reset_budget = budget - len(chunk)
        self.c2u.send(chunk)

    def _reset_mid_body(self) -> None:
        # The upstream gets the truncated request and then a FIN; the client gets a RST.
        self.closed = True
        self.reset_budget = None
        self.client.abort()
        self.u2c.discard()
        self.c2u.close_after_flush()

    def _end_request(self) -> None:
        self.state = _HEAD
        if self.discarding:
            self.discarding = False
            response, self.response = self.response, None
            if response is not None:
                self.u2c.send(response)
        elif self.reset_budget is not None:
            # The whole request fitted within the budget: reset before any answer.
            self._reset_mid_body()
