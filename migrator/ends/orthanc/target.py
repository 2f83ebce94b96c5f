"""An Orthanc as a target: `POST /instances`, and the checks `verify` asks of it.

The byte proof: the MD5 Orthanc keeps of each stored file
(``GET /instances/{id}/attachments/dicom/md5``), or the file itself when the target does
not keep MD5s; the per-study count: ``/tools/lookup`` then ``/studies/{id}/statistics``.
"""

from __future__ import annotations

import json

import httpx

from migrator.ends.base import Checked, SentRow, Stored, md5_hex
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.preflight import warn_about_target
from migrator.ends.retrying import check_with_retries
from migrator.ends.streams import Body
from migrator.errors import (
    FatalError,
    Kind,
    TransferError,
    Verdict,
    classify_exception,
    verdict_for_response,
)
from migrator.states import VerifyResult

__all__ = ["OrthancTarget"]

# Orthanc's error code for "Unknown resource": the instance is not on the target.
UNKNOWN_RESOURCE = 17


class OrthancTarget:
    """An Orthanc REST API receiving instances."""

    kind = "orthanc"
    byte_proof = True

    def __init__(self, client: OrthancClient) -> None:
        self.client = client
        self.endpoint = client.endpoint
        self.display = client.endpoint.display

    async def preflight(self) -> str:
        """Check it is an Orthanc that accepts us; warn about settings that lose data."""
        info = await self.client.system()
        warn_about_target(info.raw, self.display)
        return f"target {self.display}: Orthanc {info.version} ({info.name})"

    async def store(self, data: bytes) -> Stored:
        """POST one instance."""
        return await self.client.store(data)

    async def store_stream(self, body: Body) -> Stored:
        """POST one instance streamed from `body`."""
        return await self.client.store_stream(body)

    async def store_zip(self, data: bytes) -> list[Stored]:
        """POST a ZIP of instances (batched transfers)."""
        return await self.client.store_zip(data)

    async def probe(self) -> bool:
        """Whether `GET /system` answers again."""
        try:
            await self.client.system()
        except FatalError:
            return False
        return True

    async def check(self, row: SentRow) -> Checked:
        """Compare the target's copy of one instance with what was sent.

        Raises FatalError when the target refuses the credentials or stops answering.
        """
        if not row.orthanc_id:
            return VerifyResult.ERROR, "no Orthanc ID recorded for this row"
        if not row.md5:
            return VerifyResult.ERROR, "no MD5 was recorded when it was sent"
        response = await self._get(f"instances/{row.orthanc_id}/attachments/dicom/md5")
        if isinstance(response, Verdict):
            return VerifyResult.ERROR, response.reason
        if response.status_code == 404:
            if _unknown_resource(response):
                return VerifyResult.MISSING, "not on the target"
            # The instance is there but its MD5 was not stored (StoreMD5ForAttachments
            # false): download the file and hash it.
            response = await self._get(f"instances/{row.orthanc_id}/file")
            if isinstance(response, Verdict):
                return VerifyResult.ERROR, response.reason
            if response.status_code == 404:
                return VerifyResult.MISSING, "not on the target"
            digest = md5_hex(response.content)
            how = " (target stores no MD5s: compared the downloaded file)"
        else:
            digest = response.text.strip().strip('"').lower()
            how = ""
        if digest == row.md5.lower():
            return VerifyResult.MATCH, None
        detail = f"target MD5 {digest}, sent {row.md5}{how}"
        if row.target_status == "AlreadyStored":
            detail += "; the target answered AlreadyStored: it already held another version"
        return VerifyResult.DIFFER, detail

    async def study_count(self, study_uid: str) -> int | None:
        """Instances the target holds in the study(ies) with this StudyInstanceUID."""
        client = self.client
        try:
            response = await client.http.post("tools/lookup", content=study_uid.encode())
        except httpx.HTTPError as exc:
            raise TransferError(classify_exception(exc, side=client.role)) from None
        if response.status_code != 200:
            raise TransferError(verdict_for_response(response, side=client.role))
        total = 0
        for item in response.json():
            if item.get("Type") == "Study":
                stats = await client.get_json(f"studies/{item['ID']}/statistics")
                total += int(stats["CountInstances"])
        return total

    async def delete(self, orthanc_id: str) -> bool:
        """Delete one instance (a mirror following a deletion on its source): True when
        deleted, False when the target did not hold it. Raise TransferError."""
        return await self.client.delete_instance(orthanc_id)

    async def aclose(self) -> None:
        """Close the connection pools."""
        await self.client.aclose()

    async def _get(self, path: str) -> httpx.Response | Verdict:
        """GET with per-request retries; a 200/404 response, or the Verdict of a failure."""

        async def once() -> httpx.Response:
            try:
                response = await self.client.http.get(path)
            except httpx.HTTPError as exc:
                verdict = classify_exception(exc, side="target")
                if verdict.kind is not Kind.RETRYABLE:
                    raise FatalError(verdict.reason) from None
                raise TransferError(verdict) from None
            if response.status_code not in (200, 404):
                raise TransferError(verdict_for_response(response, side="target"))
            return response

        return await check_with_retries(once, self.client.system)


def _unknown_resource(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(body, dict) and body.get("OrthancStatus") == UNKNOWN_RESOURCE
