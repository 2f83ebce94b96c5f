"""A TCP proxy with latency, HTTP request counting and fault injection.

The proxy runs an asyncio loop in a background thread and forwards bytes between each
client connection and its own upstream connection. It parses just enough HTTP/1.1 on the
client-to-upstream stream (request line, Content-Length, chunked framing) to count
requests on keep-alive connections and to apply a per-request fault plan; responses are
forwarded untouched.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self

from migrator.testkit.faults import (
    DropResponse,
    Fault,
    FaultPlan,
    Pass,
    RandomFaults,
    Reset,
    ScriptedFaults,
    Stall,
    Status,
    fault_label,
)
from migrator.testkit.proxyconn import Connection, Link

__all__ = [
    "DropResponse",
    "Fault",
    "FaultPlan",
    "Pass",
    "Proxy",
    "RandomFaults",
    "Reset",
    "ScriptedFaults",
    "Stall",
    "Status",
]


def _prefix(path: str) -> str:
    """Return the first path segment with its slash: ``/instances/x/file`` -> ``/instances``."""
    end = path.find("/", 1)
    return path if end < 0 else path[:end]


class _ClientProtocol(asyncio.Protocol):
    """Accepted client side; everything is delegated to a :class:`Connection`."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn = self.proxy._open_connection(transport)

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.on_client_data(data)

    def eof_received(self) -> bool:
        assert self.conn is not None
        self.conn.on_client_closed(lost=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.on_client_closed(lost=True)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.u2c.dest_paused(True)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.u2c.dest_paused(False)


class Proxy:
    """TCP proxy on 127.0.0.1 in front of ``upstream_host:upstream_port``.

    ``delay`` is a one-way latency in seconds added to every chunk in both directions;
    chunks keep their order but are not serialised, so throughput is unaffected and a
    request/response round trip costs about ``2 * delay`` more. With ``tls``, clients
    connect with HTTPS. The port is chosen on the first :meth:`start` and kept across
    :meth:`down`/:meth:`up`. ``rate`` caps the bandwidth (bytes per second, each way,
    shared by all connections, as on one network link); chunks wait their turn, then
    the delay.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        delay: float = 0.0,
        tls: ssl.SSLContext | None = None,
        rate: float | None = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.delay = delay
        # Client-to-upstream and upstream-to-client halves of a full-duplex link.
        self.links: tuple[Link | None, Link | None] = (
            (Link(rate), Link(rate)) if rate else (None, None)
        )
        # A server-side TLS context: clients speak HTTPS to the proxy, which speaks plain
        # HTTP upstream (TLS terminated in front of Orthanc, as a reverse proxy does).
        self.tls = tls
        self.port: int | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.counts: Counter[tuple[str, str]] = Counter()
        self._log: list[tuple[str, str]] = []
        self._faults: Counter[str] = Counter()
        self._plan: FaultPlan | None = None
        self._lock = threading.Lock()
        self._index = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[Connection] = set()
        self._is_down = False

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL clients should use, with a trailing slash."""
        if self.port is None:
            raise RuntimeError("proxy not started")
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/"

    @property
    def is_down(self) -> bool:
        """Whether :meth:`down` is in effect."""
        return self._is_down

    def start(self) -> Self:
        """Start the loop thread; return once the proxy is listening."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="testkit-proxy", daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = None
        self._thread = None

    def down(self) -> None:
        """Simulate an unreachable target: refuse new connections, abort existing ones."""
        self._call(self._go_down())

    def up(self) -> None:
        """Undo :meth:`down`: listen again on the same port."""
        self._call(self._go_up())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy not started")
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout=30)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ClientProtocol(self),
            "127.0.0.1",
            self.port or 0,
            reuse_address=True,
            ssl=self.tls,
        )
        if self.port is None:
            self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        # Connect attempts still in flight must finish before the loop can stop cleanly.
        tasks = [c.connect_task for c in conns if c.connect_task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        await self._close_all()

    async def _go_down(self) -> None:
        self._is_down = True
        await self._close_all()

    async def _go_up(self) -> None:
        if self._is_down:
            self._is_down = False
            await self._listen()

    # -- hooks used by connections (loop thread) ----------------------------------------

    def _open_connection(self, transport: asyncio.Transport) -> Connection:
        conn = Connection(self, transport)
        self._conns.add(conn)
        return conn

    def _forget(self, conn: Connection) -> None:
        self._conns.discard(conn)

    def _on_request(self, method: str, path: str) -> Fault | None:
        """Record one request and return the fault to apply to it."""
        with self._lock:
            index = self._index
            self._index += 1
            self._log.append((method, path))
            self.counts[(method, _prefix(path))] += 1
            plan = self._plan
        fault = plan(method, path, index) if plan is not None else None
        if fault is not None and not isinstance(fault, Pass):
            with self._lock:
                self._faults[fault_label(fault)] += 1
        return fault

    # -- public accessors (any thread) ---------------------------------------------------

    def set_faults(self, plan: FaultPlan | None) -> None:
        """Install a fault plan (``None`` removes it); see :mod:`migrator.testkit.faults`."""
        with self._lock:
            self._plan = plan

    def requests(self) -> list[tuple[str, str]]:
        """Return every (method, path) seen since the last :meth:`reset_counts`."""
        with self._lock:
            return list(self._log)

    def count(self, method: str | None = None, prefix: str = "/") -> int:
        """Count requests with this method (any if ``None``) whose path starts with ``prefix``."""
        with self._lock:
            return sum(
                1 for m, p in self._log if (method is None or m == method) and p.startswith(prefix)
            )

    def fault_counts(self) -> Counter[str]:
        """Return injected faults per kind (``reset``, ``status_503``, ``drop_response``...)."""
        with self._lock:
            return Counter(self._faults)

    def reset_counts(self) -> None:
        """Clear request counts, the request log, fault counts and byte counters."""
        with self._lock:
            self.counts.clear()
            self._log.clear()
            self._faults.clear()
            self._index = 0
            self.bytes_up = 0
            self.bytes_down = 0

    def __repr__(self) -> str:
        where = f"port={self.port}" if self.port else "not started"
        return (
            f"Proxy({self.upstream_host}:{self.upstream_port}, {where}, delay={self.delay}, "
            f"down={self._is_down})"
        )
