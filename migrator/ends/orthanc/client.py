"""An asynchronous client for the parts of Orthanc's REST API a migration needs.

Every non-2xx answer and every transport error is turned into a `TransferError` (per
instance) or a `FatalError` (per run) by `migrator.errors`, never interpreted here.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import certifi
import httpcore
import httpx

from migrator.endpoints import Endpoint
from migrator.ends.base import Stored
from migrator.ends.orthanc.netio import AsyncioBackend
from migrator.ends.streams import CHUNK, Body, streamable
from migrator.errors import (
    FatalError,
    Kind,
    TransferError,
    UsageError,
    Verdict,
    classify_exception,
    verdict_for_response,
    verdict_for_store_status,
)

# Orthanc closes idle keep-alive connections after one second; reusing one just as it
# closes fails with "Server disconnected". Dropping our idle connections sooner avoids it.
KEEPALIVE_EXPIRY = 0.7
SHARD_CONNECTIONS = 4
USER_AGENT = "migrator"
# Bytes per second an Orthanc surely parses and writes (or reads) a large file at: the
# wait for its answer to a large transfer is the timeout plus the file's size at this rate.
LARGE_FILE_RATE = 20e6


@dataclass(frozen=True)
class SystemInfo:
    """What `GET /system` says about an Orthanc."""

    name: str
    version: str
    api_version: int | None
    database_version: int | None
    raw: dict[str, Any]


class OrthancClient:
    """REST client for one Orthanc (`role` is "source" or "target", used in messages)."""

    def __init__(
        self,
        endpoint: Endpoint,
        role: str,
        *,
        connections: int = 8,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.role = role
        # httpcore scans its whole pool on every request; several small pools cost far
        # less CPU per request than one big one (measured: ~17% of the client's CPU at 32).
        shards = max(1, -(-connections // SHARD_CONNECTIONS))
        per_shard = -(-connections // shards)
        tls = _tls_context(endpoint, role)
        limits = httpx.Limits(
            max_connections=per_shard,
            max_keepalive_connections=per_shard,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._transports = [_transport(tls, limits) for _ in range(shards)]
        self._shards = [self._http_client(endpoint, transport) for transport in self._transports]
        self._next = itertools.cycle(self._shards)
        # Requests in flight per pool, for the per-instance requests, which fill the pools
        # in order (the listing's last) instead of taking them in turn: a request never
        # waits in a full pool while another has a free connection, and the connections
        # in use stay busy instead of sitting idle past the keep-alive expiry (taken in
        # turn, every connection of every pool served a request now and then, and idle
        # ones were closed and opened again: a round trip each on a long link).
        self._per_shard = per_shard
        self._busy = [0] * shards
        self._fill_order = [*range(1, shards), 0]
        # Parsed once: httpx parses a string URL (and joins it to the base) per request.
        self._instances_url = httpx.URL(endpoint.url).join("instances")
        # Headers of the per-instance requests, which bypass the client layer that adds
        # them to the others: the user agent and the credentials.
        common = {"User-Agent": USER_AGENT, **_basic_auth_header(endpoint.auth)}
        # Orthanc gzips every answer a client accepts gzip for; the answer to a store is a
        # few hundred bytes of JSON, not worth deflating and inflating at each end.
        self._store_headers = {
            **common,
            "Content-Type": "application/dicom",
            "Accept-Encoding": "identity",
        }
        # File downloads ask for the bytes as stored. Orthanc's HttpCompressionEnabled (on
        # by default, and in Debian's config) otherwise gzips every file on the fly: DICOM
        # pixel data barely shrinks, and deflating costs the source ~0.05 s per MB (an
        # 8 MB file: 0.42 s gzipped, 0.05 s plain), several times the whole transfer.
        self._get_headers = {**common, "Accept-Encoding": "identity"}
        self._base = endpoint.url
        # Listing answers are JSON, which gzip shrinks ~8x: worth it over a network, not
        # on this machine, where deflating costs the source a fifth of its listing time.
        self.listing_headers = {"Accept-Encoding": "identity"} if _loopback(endpoint) else {}
        # The listing's requests (a few at a time) all go through one pool, whose
        # connections then stay busy from page to page: spread over every pool, each
        # connection sat idle past the keep-alive expiry and nearly every page opened one.
        self.listing_http = self._shards[0]
        self._extensions = {"timeout": self._timeout.as_dict()}

    def _http_client(
        self, endpoint: Endpoint, transport: httpx.AsyncHTTPTransport
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=transport,
            # Every request goes straight to the endpoint, as store() does: an
            # HTTP(S)_PROXY variable must not route some requests and not others.
            trust_env=False,
            base_url=endpoint.url,
            auth=endpoint.auth,
            timeout=self._timeout,
            headers={"User-Agent": USER_AGENT},
        )

    @property
    def http(self) -> httpx.AsyncClient:
        """An httpx client for one request (the pools are used in turn)."""
        return next(self._next)

    async def aclose(self) -> None:
        """Close every connection."""
        for shard in self._shards:
            await shard.aclose()

    async def __aenter__(self) -> OrthancClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- run-level calls: any failure is fatal for the run ------------------------------

    async def system(self) -> SystemInfo:
        """Check that the endpoint is a reachable Orthanc that accepts our credentials."""
        where = self.endpoint.display
        try:
            response = await self.http.get("system")
        except httpx.TransportError as exc:
            raise unreachable(exc, self.role, where) from None
        if response.status_code in (401, 403):
            raise FatalError(
                f"{self.role} {where} refused the credentials (HTTP {response.status_code}); "
                f"give user:password in the URL, the config file or "
                f"MIGRATOR_{self.role.upper()}_USERNAME/_PASSWORD"
            )
        if response.status_code != 200:
            raise FatalError(
                f"{self.role} {where} is not an Orthanc REST API "
                f"(GET /system answered HTTP {response.status_code})"
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "Version" not in body or "ApiVersion" not in body:
            raise FatalError(f"{self.role} {where} is not an Orthanc (unexpected /system answer)")
        return SystemInfo(
            name=str(body.get("Name", "")),
            version=str(body["Version"]),
            api_version=body.get("ApiVersion"),
            database_version=body.get("DatabaseVersion"),
            raw=body,
        )

    async def get_json(
        self,
        path: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> Any:
        """GET a JSON resource; raises TransferError (retryable/fatal) on failure."""
        try:
            response = await (http or self.http).get(path, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        if response.status_code != 200:
            raise TransferError(verdict_for_response(response, side=self.role))
        try:
            return response.json()
        except ValueError:
            raise TransferError(
                Verdict(Kind.FATAL, f"{self.role} answered non-JSON to GET {path}")
            ) from None

    async def list_instances(self, since: int, limit: int) -> list[dict[str, Any]]:
        """One page of `GET /instances?since=&limit=&expand` (an offset, not a cursor)."""
        params = {"since": since, "limit": limit, "expand": ""}
        page = await self.get_json("instances", params, self.listing_headers, self.listing_http)
        if not isinstance(page, list):
            raise TransferError(Verdict(Kind.FATAL, f"{self.role}: /instances is not a list"))
        return page

    async def instance_ids(self, since: int | None = None, limit: int | None = None) -> list[str]:
        """IDs only, from `GET /instances` (one page, or with no arguments all of them in
        one answer: a snapshot taken in one transaction of the server's index)."""
        params = {} if since is None else {"since": since, "limit": limit}
        page = await self.get_json("instances", params, self.listing_headers, self.listing_http)
        if not isinstance(page, list) or not all(isinstance(i, str) for i in page):
            raise TransferError(Verdict(Kind.FATAL, f"{self.role}: /instances is not a list"))
        return page

    async def changes(self, since: int, limit: int = 1000) -> dict[str, Any]:
        """One page of the change log after sequence number `since`."""
        return await self.get_json("changes", {"since": since, "limit": limit})

    async def last_change(self) -> int:
        """The current position of the change log."""
        body = await self.get_json("changes", {"last": ""})
        return int(body.get("Last", 0))

    async def count_instances(self) -> int:
        """How many instances the server holds, from `/statistics`."""
        body = await self.get_json("statistics")
        return int(body["CountInstances"])

    async def bulk_content(self, ids: list[str]) -> list[dict[str, Any]] | None:
        """What ``GET /{level}/{id}`` says of each resource (without metadata), for many
        at once: ``POST /tools/bulk-content`` (Orthanc 1.9.4+). Resources the server does
        not hold (deleted meanwhile) are left out of the answer. None when the server has
        no such call (older versions, or a proxy that allows it no POST)."""
        try:
            response = await self.listing_http.post(
                "tools/bulk-content",
                json={"Resources": ids, "Metadata": False},
                headers=self.listing_headers,
            )
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        if response.status_code in (403, 404, 405, 501):
            # Unknown IDs answer 200 with the resource left out: 404 is the route.
            return None
        return self._json(
            response, _list_of_objects, f"{self.role}: /tools/bulk-content is not a list"
        )

    async def find_study_ids(self, query: dict[str, str]) -> list[str]:
        """The IDs of the studies matching `query` (DICOM matching: date ranges, lists
        of modalities), in one answer: ``POST /tools/find`` at study level."""
        try:
            response = await self.listing_http.post(
                "tools/find",
                json={"Level": "Study", "Query": query, "Expand": False},
                headers=self.listing_headers,
            )
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        body = self._json(response, _list, f"{self.role}: /tools/find is not a list")
        return [i for i in body if isinstance(i, str)]

    async def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """The instances of a study as ``/instances?expand`` describes them ([] when the
        study is gone)."""
        try:
            response = await self.listing_http.get(
                f"studies/{study_id}/instances", headers=self.listing_headers
            )
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        if response.status_code == 404:
            return []
        return self._json(
            response, _list_of_objects, f"{self.role}: /studies/{{id}}/instances is not a list"
        )

    async def resource(self, level: str, orthanc_id: str) -> dict[str, Any] | None:
        """``GET /{level}/{id}`` (level: instances, series, studies), None if unknown."""
        try:
            response = await self.listing_http.get(
                f"{level}/{orthanc_id}", headers=self.listing_headers
            )
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        if response.status_code == 404:
            return None
        return self._json(response, _object, f"{self.role}: /{level}/{{id}} is not an object")

    def _json(self, response: httpx.Response, shape: Callable[[Any], bool], what: str) -> Any:
        """The JSON body of a successful answer, of the expected `shape`. Any other status
        is classified as usual; a body of another shape is fatal (`what`): the server is
        not answering as Orthanc does."""
        if response.status_code != 200:
            raise TransferError(verdict_for_response(response, side=self.role))
        try:
            body = response.json()
        except ValueError:
            body = None
        if not shape(body):
            raise TransferError(Verdict(Kind.FATAL, what))
        return body

    # -- per-instance calls -------------------------------------------------------------

    def _take_pool(self) -> int:
        """The pool for the next per-instance request (counted busy until `_busy` is
        decremented): the first with a free connection, else the least busy."""
        busy, free, best = self._busy, self._per_shard, self._fill_order[0]
        for index in self._fill_order:
            if busy[index] < free:
                best = index
                break
            if busy[index] < busy[best]:
                best = index
        busy[best] += 1
        return best

    async def _per_instance(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        content: bytes | Body | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> httpx.Response:
        # Straight to a connection pool, for the requests made once per instance: the
        # client layer (URL merging, cookies, auth flow, event hooks) cost ~0.3 ms of CPU
        # per request, a quarter of the whole request.
        request = httpx.Request(
            method,
            url,
            content=content,
            headers=headers,
            extensions=self._extensions if extensions is None else extensions,
        )
        pool = self._take_pool()
        try:
            response = await self._send(pool, request)
            await self._read_whole(response)
        finally:
            self._busy[pool] -= 1
        return response

    async def _send(self, pool: int, request: httpx.Request) -> httpx.Response:
        """The answer to `request` from connection pool `pool`, its body not read yet."""
        try:
            response = await self._transports[pool].handle_async_request(request)
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        response.request = request
        return response

    async def _read_whole(self, response: httpx.Response) -> None:
        """Read an answer's body to its end and release its connection."""
        try:
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None

    async def get_file(self, orthanc_id: str) -> bytes:
        """The original DICOM bytes of an instance."""
        url = httpx.URL(f"{self._base}instances/{orthanc_id}/file")
        response = await self._per_instance("GET", url, self._get_headers)
        if response.status_code != 200:
            raise TransferError(verdict_for_response(response, side=self.role))
        return response.content

    async def open_file(self, orthanc_id: str, size: int | None = None) -> bytes | HttpChunks:
        """The original DICOM bytes of an instance: whole when small, as chunks to stream
        when its answer announces more than `streams.STREAM_ABOVE` bytes. `size`, when
        known, is the listing's: the wait for the answer grows with it."""
        url = httpx.URL(f"{self._base}instances/{orthanc_id}/file")
        # Orthanc reads (and inflates) a whole file before answering: give it time.
        request = httpx.Request(
            "GET", url, headers=self._get_headers, extensions=self._large_extensions(size)
        )
        pool = self._take_pool()
        try:
            response = await self._send(pool, request)
            length = _content_length(response)
            if response.status_code == 200 and length is not None and streamable(length):
                # The connection stays busy until the chunks are closed.
                chunks = HttpChunks(response, length, self.role, self._busy, pool)
                pool = -1
                return chunks
            await self._read_whole(response)
        finally:
            if pool >= 0:
                self._busy[pool] -= 1
        if response.status_code != 200:
            raise TransferError(verdict_for_response(response, side=self.role))
        return response.content

    async def store_stream(self, body: Body) -> Stored:
        """POST one DICOM file streamed from its source, `body.length` bytes announced
        in Content-Length; returns only when the target confirmed it holds it. A failure
        of the source while it is read is raised as is (and kept in `body.failure`)."""
        headers = {**self._store_headers, "Content-Length": str(body.length)}
        response = await self._per_instance(
            "POST", self._instances_url, headers, body, self._large_extensions(body.length)
        )
        return self._stored(response)

    def _large_extensions(self, size: int | None) -> dict[str, Any]:
        # Orthanc parses and writes all of a file before answering a store (and reads
        # all of it before answering a GET).
        return {"timeout": grown_timeout(self._timeout, size).as_dict()}

    async def store(self, data: bytes) -> Stored:
        """POST one DICOM file; returns only when the target confirmed it holds it."""
        response = await self._per_instance(
            "POST", self._instances_url, self._store_headers, content=data
        )
        return self._stored(response)

    def _stored(self, response: httpx.Response) -> Stored:
        """The confirmation in the target's answer to a POST /instances, or TransferError."""
        # Orthanc answers one JSON object per stored file; anything else is not a
        # confirmation (e.g. a proxy's page), so it cannot count as sent.
        body = self._json(
            response, _object, "target answered POST /instances without Orthanc's JSON"
        )
        status = body.get("Status")
        verdict = verdict_for_store_status(status)
        if verdict is not None:
            raise TransferError(verdict)
        return Stored(status=str(status), orthanc_id=body.get("ID"))

    # -- batched calls (several instances per request) ----------------------------------

    async def create_archive(self, orthanc_ids: list[str]) -> bytes:
        """A ZIP of the stored files of these instances (`POST /tools/create-archive`,
        synchronous). One unknown ID makes Orthanc answer 404 for the whole call."""
        url = httpx.URL(f"{self._base}tools/create-archive")
        body = json.dumps({"Resources": orthanc_ids, "Synchronous": True}).encode()
        headers = {**self._get_headers, "Content-Type": "application/json"}
        response = await self._per_instance("POST", url, headers, content=body)
        if response.status_code != 200:
            raise TransferError(verdict_for_response(response, side=self.role))
        return response.content

    async def round_trip(self, tries: int = 3) -> float:
        """Seconds of the fastest of `tries` `GET /system` on one connection: the network's
        round trip (the first try also opens the connection; the server does next to
        nothing for this request, whatever its load)."""
        best = float("inf")
        for _ in range(tries):
            started = time.monotonic()
            try:
                response = await self._shards[0].get("system")
            except httpx.HTTPError as exc:
                raise TransferError(classify_exception(exc, side=self.role)) from None
            await response.aclose()
            best = min(best, time.monotonic() - started)
        return best

    async def store_zip(self, data: bytes) -> list[Stored]:
        """POST a ZIP of DICOM files; one `Stored` per file the target stored. Orthanc
        leaves the files it cannot store out of its answer: what is missing is not
        confirmed, and only the IDs say which file each entry is."""
        headers = {**self._store_headers, "Content-Type": "application/zip"}
        response = await self._per_instance("POST", self._instances_url, headers, content=data)
        body = self._json(
            response, _list_of_objects, "target answered a ZIP POST /instances without a JSON list"
        )
        return [
            Stored(status=str(entry.get("Status")), orthanc_id=entry.get("ID")) for entry in body
        ]

    async def delete_instance(self, orthanc_id: str) -> bool:
        """``DELETE /instances/{id}``: True when deleted, False when it was not there."""
        return await self._unless_unknown("DELETE", f"instances/{orthanc_id}") is not None

    async def attachment_md5(self, orthanc_id: str) -> str | None:
        """MD5 of the stored DICOM attachment, or None if the instance is not there."""
        path = f"instances/{orthanc_id}/attachments/dicom/md5"
        response = await self._unless_unknown("GET", path)
        return None if response is None else response.text.strip().strip('"')

    async def _unless_unknown(self, method: str, path: str) -> httpx.Response | None:
        """The successful answer to one request about a resource, None when the server
        does not know it (404); any other failure raised as a TransferError."""
        try:
            response = await self.http.request(method, path)
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise TransferError(verdict_for_response(response, side=self.role))
        return response


class HttpChunks:
    """The body of a file download, in chunks of about `streams.CHUNK` bytes (see
    `streams.Chunks`); `length` is the answer's Content-Length."""

    def __init__(
        self,
        response: httpx.Response,
        length: int,
        role: str,
        busy: list[int] | None = None,
        pool: int = 0,
    ) -> None:
        self._response = response
        self.length = length
        self._role = role
        # The client's count of requests in flight on the connection's pool, released
        # when the chunks are closed.
        self._busy = busy
        self._pool = pool
        self.md5: str | None = None  # see RestSource.open
        self.hashes = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        # The connection hands over 64 KiB at a time; fewer, larger writes to the target
        # cost less CPU per byte.
        parts: list[bytes] = []
        size = 0
        try:
            async for piece in self._response.aiter_raw():
                parts.append(piece)
                size += len(piece)
                if size >= CHUNK:
                    yield b"".join(parts)
                    parts, size = [], 0
        except httpx.HTTPError as exc:
            # A connection cut mid-answer arrives here (the body is shorter than its
            # Content-Length): retryable, as any network error.
            raise TransferError(classify_exception(exc, side=self._role)) from None
        if parts:
            yield b"".join(parts)

    async def aclose(self) -> None:
        """Release the connection (closed, when the answer was not read to its end)."""
        if self._busy is not None:
            self._busy[self._pool] -= 1
            self._busy = None
        await self._response.aclose()


def _object(body: Any) -> bool:
    return isinstance(body, dict)


def _list(body: Any) -> bool:
    return isinstance(body, list)


def _list_of_objects(body: Any) -> bool:
    return isinstance(body, list) and all(isinstance(item, dict) for item in body)


def _content_length(response: httpx.Response) -> int | None:
    """The Content-Length of an answer sent as is (None when absent, unreadable or the
    body is encoded: then its length is not the file's)."""
    if response.headers.get("Content-Encoding", "identity") != "identity":
        return None
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _tls_context(endpoint: Endpoint, role: str) -> ssl.SSLContext:
    """One TLS context for all the pools of an endpoint (building one loads the CA bundle,
    ~30 ms). Plain HTTP never uses it (redirects are not followed), but httpx builds one
    anyway unless given one: an empty context costs nothing."""
    if not endpoint.url.startswith("https:"):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        return ssl.create_default_context(cafile=endpoint.ca_file or certifi.where())
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"{role} ca_file {endpoint.ca_file}: cannot be used ({reason})") from None


def _transport(tls: ssl.SSLContext, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connection pool runs on `netio`'s asyncio backend."""
    transport = httpx.AsyncHTTPTransport(verify=tls, limits=limits)
    default = getattr(transport, "_pool", None)
    # httpx takes no network backend: its pool is replaced by the same pool built with
    # ours. Should a future httpx keep its pool elsewhere, its own backend is used.
    if isinstance(default, httpcore.AsyncConnectionPool):
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )
    return transport


def _loopback(endpoint: Endpoint) -> bool:
    """Whether the endpoint is on this machine (a loopback address or localhost)."""
    host = httpx.URL(endpoint.url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _basic_auth_header(auth: tuple[str, str] | None) -> dict[str, str]:
    """The Authorization header httpx's BasicAuth would send (UTF-8 credentials)."""
    if auth is None:
        return {}
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def grown_timeout(timeout: httpx.Timeout, size: int | None) -> httpx.Timeout:
    """`timeout` with the wait for an answer grown with a file of `size` bytes, which
    the server handles whole before it answers (`LARGE_FILE_RATE`)."""
    if timeout.read is None:
        return timeout
    return httpx.Timeout(
        connect=timeout.connect,
        read=timeout.read + (size or 0) / LARGE_FILE_RATE,
        write=timeout.write,
        pool=timeout.pool,
    )


def unreachable(exc: httpx.TransportError, role: str, where: str) -> FatalError:
    """The one line for an endpoint that a run's first request did not reach."""
    if isinstance(exc, httpx.TimeoutException):
        return FatalError(f"{role} {where} did not answer in time")
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return FatalError(
            f"{role} {where}: its TLS certificate is not trusted ({exc}); give "
            f"the CA that signed it as [{role}] ca_file in the config"
        )
    return FatalError(f"{role} {where} is unreachable: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    if "Connection refused" in text or ("ConnectError" in type(exc).__name__ and not text):
        return "connection refused"
    return text or type(exc).__name__
