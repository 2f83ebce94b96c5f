"""An async client for the three DICOMweb services migrator uses: QIDO-RS (search),
WADO-RS (retrieve one instance as stored) and STOW-RS (store).

Every failure leaves here classified (`migrator.errors`): an answer that is not JSON
where QIDO-RS answers JSON means the URL is not a DICOMweb service root (fatal, one
line); refused credentials are fatal; network errors and 5xx are retryable; a WADO-RS
multipart cut short is retryable; 404 on a retrieve means the instance vanished.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import httpx

from migrator.endpoints import Endpoint
from migrator.ends.dicomweb.multipart import (
    Truncated,
    boundary_of,
    related_body,
    related_frame,
    split_related,
)
from migrator.ends.dicomweb.parts import PartChunks, first_part
from migrator.ends.dicomweb.spilled import NoRoom, SeriesParts
from migrator.ends.orthanc.client import (
    USER_AGENT,
    _tls_context,
    _transport,
    grown_timeout,
    unreachable,
)
from migrator.ends.spool import Spooled, SpoolFolder
from migrator.errors import (
    FatalError,
    Kind,
    TransferError,
    Verdict,
    classify_exception,
    verdict_for_response,
)

if TYPE_CHECKING:
    from migrator.ends.streams import Body

__all__ = ["PREFIX", "DicomWebClient", "tag_value"]

# The scheme prefix of a DICOMweb URL (`dicomweb+http://host/dicom-web`).
PREFIX = "dicomweb+"
# Idle pooled connections are dropped before Orthanc's 1 s keep-alive ends them under us.
KEEPALIVE_EXPIRY = 0.5
# The stored bytes, whatever their transfer syntax (no transcoding on the way).
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JSON = "application/dicom+json, application/json"
# Bytes of a kept file read to find its SOPInstanceUID.
UID_WITHIN = 64 * 1024
# Bytes of a series answer handed at once to the thread that writes them to a file.
TO_DISK_AT_ONCE = 1 << 20


def tag_value(item: dict[str, Any], tag: str) -> Any:
    """The first value of `tag` in a DICOM JSON object, or None (a PN gives its
    Alphabetic form)."""
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    value = values[0]
    if isinstance(value, dict) and "Alphabetic" in value:
        return value["Alphabetic"]
    return value


def tag_values(item: dict[str, Any], tag: str) -> list[Any]:
    """Every value of `tag` in a DICOM JSON object."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return list(values) if isinstance(values, list) else []


class DicomWebClient:
    """One DICOMweb service root, with basic auth (from the URL or the settings) or a
    bearer token."""

    def __init__(
        self,
        endpoint: Endpoint,
        role: str,
        *,
        token: str | None = None,
        connections: int = 16,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.role = role
        self.display = PREFIX + endpoint.display
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        self.http = httpx.AsyncClient(
            base_url=endpoint.url,
            auth=None if token else endpoint.auth,
            headers={"User-Agent": USER_AGENT, **headers},
            # Straight to the endpoint, as the Orthanc client goes: no HTTP(S)_PROXY.
            trust_env=False,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=_transport(_tls_context(endpoint, role), limits),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    # -- run-level ----------------------------------------------------------------------

    async def check(self) -> int:
        """Make sure the root answers QIDO-RS and accepts us: the number of studies in
        a one-study search (0 or 1). Raises FatalError, in one line."""
        where = self.display
        try:
            response = await self.http.get(
                "studies", params={"limit": "1"}, headers={"Accept": ACCEPT_JSON}
            )
        except httpx.TransportError as exc:
            raise unreachable(exc, self.role, where) from None
        if response.status_code in (401, 403, 407):
            raise FatalError(
                f"{self.role} {where} refused the credentials (HTTP {response.status_code}); "
                f"give user:password in the URL or the config, or a token "
                f"([{self.role}] token, MIGRATOR_{self.role.upper()}_TOKEN)"
            )
        if response.status_code == 204:
            return 0
        if response.status_code != 200:
            raise FatalError(
                f"{self.role} {where} is not a DICOMweb service root "
                f"(QIDO-RS GET studies answered HTTP {response.status_code})"
            )
        return len(self._json_list(response, "studies"))

    async def answers(self) -> bool:
        """Whether the root answers QIDO-RS again (the circuit breaker's probe)."""
        try:
            await self.check()
        except FatalError:
            return False
        return True

    # -- QIDO-RS ------------------------------------------------------------------------

    async def search(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """A QIDO-RS search (`studies`, `studies/{uid}/series`...): the matches.

        A 404 is no match (the study or series went away meanwhile). Raises
        TransferError (retryable failures) or FatalError (credentials, not JSON).
        """
        try:
            response = await self.http.get(path, params=params, headers={"Accept": ACCEPT_JSON})
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        if response.status_code in (204, 404):
            return []
        if response.status_code != 200:
            verdict = verdict_for_response(response, side=self.role)
            if verdict.kind is Kind.RETRYABLE:
                raise TransferError(verdict)
            raise FatalError(f"{self.role} {self.display}: QIDO-RS {path}: {verdict.reason}")
        return self._json_list(response, path)

    def _json_list(self, response: httpx.Response, path: str) -> list[dict[str, Any]]:
        """The QIDO-RS answer as a list of DICOM JSON objects, or one clear fatal line."""
        kind = response.headers.get("Content-Type", "no Content-Type").split(";")[0]
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            body = None
        if not isinstance(body, list) or not all(isinstance(i, dict) for i in body):
            raise FatalError(
                f"{self.role} {self.display}: the QIDO-RS answer to {path} is not DICOM JSON "
                f"({kind}, {len(response.content)} bytes): is this a DICOMweb service root?"
            )
        return body

    # -- WADO-RS ------------------------------------------------------------------------

    async def retrieve(self, study: str, series: str, sop: str) -> bytes:
        """The stored file of one instance, unchanged. Raises TransferError: vanished on
        404, retryable when the answer was cut short."""
        data = await self.open_instance(study, series, sop)
        assert isinstance(data, bytes)
        return data

    async def open_instance(
        self, study: str, series: str, sop: str, stream_above: int | None = None
    ) -> bytes | PartChunks:
        """`retrieve`, except that a part announced larger than `stream_above` bytes is
        handed out as it arrives (`PartChunks`), not read whole first."""
        path = f"studies/{study}/series/{series}/instances/{sop}"
        # No gzip: DICOM pixel data rarely compresses, and the bytes are hashed as is.
        headers = {"Accept": ACCEPT_DICOM, "Accept-Encoding": "identity"}
        response: httpx.Response | None = None
        try:
            request = self.http.build_request("GET", path, headers=headers)
            response = await self.http.send(request, stream=True)
            if response.status_code != 200:
                await response.aread()
                raise TransferError(verdict_for_response(response, side=self.role))
            content_type = response.headers.get("Content-Type", "")
            boundary = boundary_of(content_type)
            pieces = response.aiter_bytes()
            read = b""
            if boundary is not None and stream_above is not None:
                read, part = await first_part(pieces, boundary)
                if part is not None and part[1] > stream_above:
                    begin, length = part
                    chunks = PartChunks(response, pieces, read[begin:], length, boundary, self.role)
                    response = None  # the chunks' now
                    return chunks
            content = read + b"".join([piece async for piece in pieces])
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        finally:
            if response is not None:
                await response.aclose()
        if boundary is None:
            if content_type.split(";")[0].strip().lower() == "application/dicom":
                return content  # a server answering the single part bare
            raise TransferError(
                Verdict(
                    Kind.FATAL,
                    f"{self.role} {self.display}: WADO-RS answered {content_type or 'no type'}, "
                    f"not multipart/related DICOM",
                )
            )
        try:
            parts = split_related(content, boundary)
        except Truncated as exc:
            raise TransferError(
                Verdict(Kind.RETRYABLE, f"{self.role} WADO-RS answer cut short: {exc}")
            ) from None
        if len(parts) != 1:
            raise TransferError(
                Verdict(Kind.RETRYABLE, f"{self.role} WADO-RS answered {len(parts)} parts, not 1")
            )
        return parts[0]

    async def retrieve_series(
        self, study: str, series: str, most: int, spool: SpoolFolder | None = None
    ) -> dict[str, bytes | Spooled] | None:
        """The stored files of a whole series by SOPInstanceUID (parts whose UID cannot
        be read are left out), split as the answer arrives (`spilled.SeriesParts`): in
        memory up to `most` bytes, past them in files of `spool` while it has room; None
        when the answer does not fit (no `spool`: larger than `most`). Raises
        TransferError."""
        path = f"studies/{study}/series/{series}"
        headers = {"Accept": ACCEPT_DICOM, "Accept-Encoding": "identity"}
        try:
            async with self.http.stream("GET", path, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise TransferError(verdict_for_response(response, side=self.role))
                boundary = boundary_of(response.headers.get("Content-Type", ""))
                total = int(response.headers.get("Content-Length") or 0)
                if boundary is None or (total > most and (spool is None or not spool.room(total))):
                    return None
                parts = SeriesParts(boundary, most, spool)
                try:
                    await _feed(parts, response.aiter_raw())
                    found = parts.finish()
                except NoRoom:
                    parts.abandon()
                    return None
                except Truncated as exc:
                    parts.abandon()
                    raise TransferError(
                        Verdict(Kind.RETRYABLE, f"{self.role} WADO-RS answer cut short: {exc}")
                    ) from None
                except BaseException:
                    parts.abandon()
                    raise
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        return await asyncio.to_thread(_by_uid, found)

    # -- STOW-RS ------------------------------------------------------------------------

    async def store(self, datas: list[bytes]) -> tuple[int, dict[str, Any]]:
        """POST instances in one STOW-RS request: the HTTP status and the answer's DICOM
        JSON (empty when it has none). Raises TransferError for statuses that say nothing
        per instance (network errors, 5xx, 401...)."""
        body, content_type = related_body(datas)
        return await self._stow(body, {"Content-Type": content_type})

    async def store_stream(self, body: Body) -> tuple[int, dict[str, Any]]:
        """`store` of one large instance read from `body` as it is sent (a multipart
        body of announced length around its chunks). A failure of the source while it is
        read is raised as is (and kept in `body.failure`): the request ends before the
        body's end, and the server stores nothing."""
        head, end, content_type = related_frame()
        tail = b"\r\n" + end

        async def content() -> AsyncIterator[bytes]:
            yield head
            async for chunk in body:
                yield chunk
            yield tail

        length = len(head) + body.length + len(tail)
        headers = {"Content-Type": content_type, "Content-Length": str(length)}
        return await self._stow(content(), headers, grown_timeout(self.http.timeout, body.length))

    async def _stow(
        self,
        content: bytes | AsyncIterator[bytes],
        headers: dict[str, str],
        timeout: httpx.Timeout | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """POST a STOW-RS body; the HTTP status and the answer's DICOM JSON."""
        try:
            response = await self.http.post(
                "studies",
                content=content,
                headers={**headers, "Accept": "application/dicom+json"},
                timeout=timeout or self.http.timeout,
            )
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=self.role)) from None
        answer: Any = None
        if response.content:
            try:
                answer = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                answer = None
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]  # some servers wrap the one object in a list
        if not isinstance(answer, dict) or not answer:
            if response.status_code in (200, 202):
                raise TransferError(
                    Verdict(
                        Kind.FATAL,
                        f"{self.role} {self.display}: STOW-RS answered HTTP "
                        f"{response.status_code} without a DICOM JSON store result",
                    )
                )
            raise TransferError(verdict_for_response(response, side=self.role))
        if response.status_code in (401, 403, 407) or response.status_code >= 500:
            raise TransferError(verdict_for_response(response, side=self.role))
        return response.status_code, answer


async def _feed(parts: SeriesParts, pieces: AsyncIterator[bytes]) -> None:
    """Feed an answer to `parts`: on the event loop while its parts stay in memory, on a
    thread, a MiB at a time, while one goes to a file (a disk write may wait)."""
    pending: list[bytes] = []
    size = 0
    async for piece in pieces:
        if not pending and not parts.on_disk:
            parts.feed(piece)
            continue
        pending.append(piece)
        size += len(piece)
        if size >= TO_DISK_AT_ONCE:
            await _on_thread(parts.feed, b"".join(pending))
            pending, size = [], 0
    if pending:
        await _on_thread(parts.feed, b"".join(pending))


async def _on_thread(call: Callable[[bytes], None], data: bytes) -> None:
    """`call(data)` on a thread. Cancelled, it still waits for the thread to end: what
    the call writes to must not be released (`SeriesParts.abandon`) under it."""
    future = asyncio.get_running_loop().run_in_executor(None, call, data)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _by_uid(parts: list[bytes | Spooled]) -> dict[str, bytes | Spooled]:
    """Parts by their SOPInstanceUID (a file's read from its start); a part without one
    is dropped (blocking: reads files)."""
    found: dict[str, bytes | Spooled] = {}
    for part in parts:
        if isinstance(part, Spooled):
            with open(part.path, "rb") as fh:
                uid = sop_uid_of(fh.read(UID_WITHIN))
        else:
            uid = sop_uid_of(part)
        if uid and uid not in found:
            found[uid] = part
        else:
            SpoolFolder.discard(part)
    return found


def sop_uid_of(data: bytes) -> str | None:
    """The SOPInstanceUID of a Part-10 file (its header read quickly, else by pydicom)."""
    from migrator.ends.folder.dicomhead import Unsupported, read_header

    try:
        return read_header(data).sop_uid or None
    except Unsupported:
        pass
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # any unreadable file simply has no UID here
        return None
    uid = getattr(ds, "SOPInstanceUID", None)
    return str(uid).strip("\0 ") if uid else None
