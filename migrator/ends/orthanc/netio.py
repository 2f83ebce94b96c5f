"""httpcore's network layer on plain asyncio streams.

httpcore reaches the network through a pluggable backend; on asyncio its default goes
through anyio, which wraps every read and write in a cancel scope and rebuilds a dict of
socket attributes each time the pool checks whether an idle connection was closed. At
one small POST per instance that wrapping was ~0.3 ms of CPU per request (a quarter of
the client's cost; measured against a local Orthanc, 1,500 POSTs, c=8: 1.0 → 0.72 ms).
This backend implements httpcore's documented `AsyncNetworkBackend` interface on
asyncio's own streams and maps failures to httpcore's exceptions exactly as the anyio
backend does, so httpx (and `migrator.errors`) see the same errors.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore

# Read-ahead buffer per connection: asyncio pauses reading a socket when twice this much
# is waiting; DICOM files are often larger than the 64 KiB default.
_STREAM_LIMIT = 1 << 20


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection as httpcore sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to `max_bytes` bytes; b"" when the peer closed the connection."""
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("timed out reading from the server") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send all of `buffer` (waits while the socket's send buffer is full)."""
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("timed out writing to the server") from None
        except (OSError, RuntimeError) as exc:
            # RuntimeError: asyncio refuses writes on a transport it already closed.
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        """Close the connection at once (nothing waits for the peer)."""
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Upgrade this connection to TLS in place."""
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            self._writer.close()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        """What httpcore asks of a connection: its socket, TLS object, addresses, and
        whether an idle connection became readable (the server closed it)."""
        if info == "is_readable":
            return self._is_readable()
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        return None

    def _is_readable(self) -> bool:
        # asyncio reads ahead: an EOF or reset may already have been taken off the socket.
        if self._reader.at_eof() or self._reader.exception() is not None:
            return True
        if self._writer.is_closing():
            return True
        sock = self._writer.get_extra_info("socket")
        if sock is None:
            return True
        try:
            poll = select.poll()
            poll.register(sock.fileno(), select.POLLIN)
            return bool(poll.poll(0))
        except (OSError, ValueError):
            return True


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens `AsyncioStream` connections for an httpcore connection pool."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple[Any, ...]] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A new TCP connection (asyncio turns Nagle off on it)."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    limit=_STREAM_LIMIT,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        """httpcore's pause between connection retries."""
        await asyncio.sleep(seconds)


__all__ = ["AsyncioBackend", "AsyncioStream"]
