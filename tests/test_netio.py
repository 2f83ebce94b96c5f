"""httpcore's network layer on asyncio streams (`migrator.ends.orthanc.netio`), against real
servers:
a real Orthanc, a TLS server on loopback, a server that never answers, a closed port."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpcore
import httpx
import pytest
from conftest import self_signed

from migrator.endpoints import parse_endpoint
from migrator.ends.orthanc.client import OrthancClient, _transport
from migrator.ends.orthanc.netio import AsyncioBackend
from migrator.errors import Kind, classify_exception
from migrator.testkit.orthanc import OrthancProcess, free_port


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    with OrthancProcess(tmp_path_factory.mktemp("netio")) as server:
        yield server


def test_every_pool_of_the_client_runs_on_asyncio_streams(orthanc: OrthancProcess) -> None:
    async def main() -> str:
        async with OrthancClient(parse_endpoint(orthanc.url, role="target"), "target") as client:
            for transport in client._transports:
                assert isinstance(transport._pool._network_backend, AsyncioBackend)
            return (await client.system()).version

    assert asyncio.run(main()) == orthanc.system()["Version"]


def test_a_connection_the_server_closed_is_not_reused(orthanc: OrthancProcess) -> None:
    # Orthanc closes idle keep-alive connections after a second. The pool must see that
    # (`is_readable`) and open a new one, not send the next request into a dead socket.
    async def main() -> tuple[bool, bool, int]:
        backend = AsyncioBackend()
        async with httpcore.AsyncConnectionPool(
            network_backend=backend, keepalive_expiry=60
        ) as pool:
            first = await pool.request("GET", orthanc.url + "system")
            assert first.status == 200
            (conn,) = pool.connections
            stream = conn._connection._network_stream
            fresh = stream.get_extra_info("is_readable")
            await asyncio.sleep(2.5)
            closed = stream.get_extra_info("is_readable")
            second = await pool.request("GET", orthanc.url + "system")
            return fresh, closed, second.status

    fresh, closed, status = asyncio.run(main())
    assert (fresh, closed, status) == (False, True, 200)


def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    async def main() -> BaseException:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # reads the request, never answers, until the client leaves
            writer.close()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = _transport(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), httpx.Limits())
        async with server, httpx.AsyncClient(transport=transport, timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.post(f"http://127.0.0.1:{port}/instances", content=b"x" * 100)
            return caught.value

    verdict = classify_exception(asyncio.run(main()), side="target")
    assert verdict.kind is Kind.RETRYABLE and "timed out" in verdict.reason


def test_a_closed_port_is_a_connect_error() -> None:
    async def main() -> None:
        transport = _transport(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), httpx.Limits())
        async with httpx.AsyncClient(transport=transport, timeout=2) as client:
            await client.get(f"http://127.0.0.1:{free_port()}/system")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(main())


def test_https_through_the_asyncio_backend(tmp_path: Path) -> None:
    cert, server_tls = self_signed(tmp_path)
    client_tls = ssl.create_default_context(cafile=str(cert))
    body = b'{"Status": "Success"}'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                b":"
            )[1]
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def main() -> tuple[int, bytes, str | None]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        transport = _transport(client_tls, httpx.Limits())
        async with server, httpx.AsyncClient(transport=transport, timeout=5) as client:
            response = await client.post(f"https://localhost:{port}/instances", content=b"d" * 5000)
            return (
                response.status_code,
                response.content,
                response.extensions.get("http_version", b"").decode() or None,
            )

    status, content, version = asyncio.run(main())
    assert (status, content, version) == (200, body, "HTTP/1.1")


def test_https_refuses_a_certificate_it_cannot_verify(tmp_path: Path) -> None:
    _, server_tls = self_signed(tmp_path)

    async def main() -> None:
        async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(idle, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        transport = _transport(ssl.create_default_context(), httpx.Limits())
        async with server, httpx.AsyncClient(transport=transport, timeout=5) as client:
            await client.get(f"https://localhost:{port}/system")

    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(main())
