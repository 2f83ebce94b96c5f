"""A DICOMweb service as a target: STOW-RS stores, WADO-RS and QIDO-RS check.

Each instance's outcome is read from the STOW-RS answer: listed in the
ReferencedSOPSequence it is stored (with its WarningReason, if any); listed in the
FailedSOPSequence its FailureReason decides (`errors.verdict_for_stow_failure`); named
in neither, the HTTP status does (`errors.verdict_for_stow_silence`). A large instance
goes alone, streamed from its source (`store_stream`).

`check` (verify) retrieves the stored file by WADO-RS with ``transfer-syntax=*`` and
compares its MD5 with the one sent: between servers that keep files as received (two
Orthancs) that is a byte proof. Where the file cannot be had (no MD5 recorded, retrieve
refused or unsupported) a QIDO-RS search by UID says whether the instance is there:
`present`, which verify reports apart from `match`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from migrator.ends.base import Checked, SentRow, Stored, md5_hex
from migrator.ends.dicomweb.batches import StowBatches
from migrator.ends.dicomweb.client import DicomWebClient, sop_uid_of, tag_value, tag_values
from migrator.ends.retrying import check_with_retries
from migrator.errors import (
    Kind,
    TransferError,
    Verdict,
    verdict_for_stow_failure,
    verdict_for_stow_silence,
)
from migrator.states import VerifyResult

if TYPE_CHECKING:
    from migrator.ends.streams import Body

__all__ = ["DicomWebTarget"]

log = logging.getLogger("migrator")

# STOW-RS requests under way at once: the fewer, the more instances each carries, but
# the longer a store waits (which the engine's self-tuning reads as a slower target).
STOW_REQUESTS = 4
# Per-request retries of retryable failures before a check is `error`.
FAILED_SOPS = "00081198"
REFERENCED_SOPS = "00081199"
SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
NUMBER_OF_STUDY_INSTANCES = "00201208"

Outcome = Stored | TransferError


class DicomWebTarget:
    """A DICOMweb service root receiving instances by STOW-RS."""

    kind = "dicomweb"
    byte_proof = True

    def __init__(
        self, client: DicomWebClient, *, requests: int = STOW_REQUESTS, most: int = 32
    ) -> None:
        # Not `client`: to the engine that names an Orthanc REST client.
        self.web = client
        self.display = client.display
        # `most` 1: every single store in a request of its own (``--batch 1``).
        self.batches = StowBatches(self._send_batch, requests=requests, most=most)

    async def preflight(self) -> str:
        """Check the root answers QIDO-RS and accepts the credentials."""
        await self.web.check()
        return f"target {self.display}: DICOMweb (QIDO-RS answers)"

    async def store(self, data: bytes) -> Stored:
        """Store one instance: alone, or in one STOW-RS request with the instances whose
        stores arrive while the earlier requests are under way (`StowBatches`)."""
        outcome = await self.batches.store(data)
        if isinstance(outcome, TransferError):
            raise outcome
        return outcome

    async def store_many(self, datas: list[bytes]) -> list[Outcome]:
        """Store several instances in one STOW-RS request: one outcome per instance, in
        order (a `Stored`, or the `TransferError` its row is to be settled with).

        A failure of the whole request (network, 5xx, credentials) is raised instead.
        """
        outcomes, status = await self._stow(datas)
        return [
            TransferError(verdict_for_stow_silence(status)) if o is None else o for o in outcomes
        ]

    async def _send_batch(self, datas: list[bytes]) -> list[Outcome]:
        """`store_many`, except that instances the answer does not name are sent again
        one by one: a server refusing a request as a whole must not have an instance
        refused for its neighbour's content."""
        outcomes, status = await self._stow(datas)
        if len(datas) == 1 or all(o is not None for o in outcomes):
            return [
                TransferError(verdict_for_stow_silence(status)) if o is None else o
                for o in outcomes
            ]
        out: list[Outcome] = []
        for data, outcome in zip(datas, outcomes, strict=True):
            if outcome is None:
                try:
                    outcome = (await self.store_many([data]))[0]
                except TransferError as exc:
                    outcome = exc
            out.append(outcome)
        return out

    async def store_stream(self, body: Body) -> Stored:
        """Store one large instance by STOW-RS as its chunks come from the source (a
        request of its own)."""
        status, answer = await self.web.store_stream(body)
        [outcome] = _outcomes(answer, status, None)
        if outcome is None:
            raise TransferError(verdict_for_stow_silence(status))
        if isinstance(outcome, TransferError):
            raise outcome
        return outcome

    async def _stow(self, datas: list[bytes]) -> tuple[list[Outcome | None], int]:
        """One STOW-RS request: each instance's outcome (None when the answer names it
        neither as stored nor as failed) and the HTTP status."""
        status, answer = await self.web.store(datas)
        return _outcomes(answer, status, datas), status

    async def probe(self) -> bool:
        """Whether QIDO-RS answers again."""
        return await self.web.answers()

    async def check(self, row: SentRow) -> Checked:
        """Whether the target holds `row`: `match`/`differ` by the MD5 of the file
        WADO-RS hands back; `present` when only a QIDO-RS search can tell."""
        if not (row.study_uid and row.series_uid and row.sop_uid):
            return VerifyResult.ERROR, "no study/series/SOP UIDs recorded for this row"
        got = await check_with_retries(
            lambda: self.web.retrieve(row.study_uid, row.series_uid, row.sop_uid),  # type: ignore[arg-type]
            self.web.check,
        )
        if isinstance(got, bytes):
            if not row.md5:
                return VerifyResult.PRESENT, "no MD5 was recorded when it was sent"
            digest = md5_hex(got)
            if digest == row.md5.lower():
                return VerifyResult.MATCH, None
            return VerifyResult.DIFFER, (
                f"target file MD5 {digest}, sent {row.md5} (an older version kept, or the "
                f"server re-encodes what it stores)"
            )
        if got.kind is Kind.RETRYABLE:
            return VerifyResult.ERROR, got.reason
        # No file to compare (404, or retrieve refused): ask whether the UID is there.
        found = await check_with_retries(lambda: self._exists(row), self.web.check)
        if isinstance(found, Verdict):
            return VerifyResult.ERROR, found.reason
        if not found:
            return VerifyResult.MISSING, "not on the target"
        return VerifyResult.PRESENT, f"found by QIDO-RS; WADO-RS retrieve: {got.reason}"

    async def _exists(self, row: SentRow) -> bool:
        path = f"studies/{row.study_uid}/series/{row.series_uid}/instances"
        return bool(await self.web.search(path, {"SOPInstanceUID": str(row.sop_uid)}))

    async def study_count(self, study_uid: str) -> int | None:
        """NumberOfStudyRelatedInstances of the study, by QIDO-RS (None: not answered)."""
        matches = await self.web.search(
            "studies",
            {"StudyInstanceUID": study_uid, "includefield": NUMBER_OF_STUDY_INSTANCES},
        )
        total = 0
        for item in matches:
            value = tag_value(item, NUMBER_OF_STUDY_INSTANCES)
            if value is None:
                return None
            total += int(value)
        return total

    async def aclose(self) -> None:
        """Close the connection pool once the requests under way have ended."""
        await self.batches.aclose()
        if self.batches.requests_sent:
            log.info(
                "target %s: %d instances in %d STOW-RS requests",
                self.display,
                self.batches.instances_sent,
                self.batches.requests_sent,
            )
        await self.web.aclose()


def _stored(item: dict[str, Any], warning: Any) -> Stored:
    reason = tag_value(item, WARNING_REASON) or warning
    text = f"STOW-RS warning 0x{int(reason):04X}" if isinstance(reason, int) else None
    return Stored("Success", None, warning=text)


def _failed(item: dict[str, Any], http_status: int) -> Outcome:
    reason = tag_value(item, FAILURE_REASON)
    verdict = verdict_for_stow_failure(reason if isinstance(reason, int) else None)
    if verdict is None:
        return Stored("AlreadyStored", None)
    return TransferError(Verdict(verdict.kind, verdict.reason, http_status))


def _outcomes(
    answer: dict[str, Any], status: int, datas: list[bytes] | None
) -> list[Outcome | None]:
    """Each instance's outcome read from a STOW-RS answer (None when it names it neither
    as stored nor as failed): those of `datas`, matched by SOP Instance UID, or of the
    one instance (None) the request carried."""
    stored = {
        str(tag_value(item, SOP_INSTANCE)): item
        for item in tag_values(answer, REFERENCED_SOPS)
        if isinstance(item, dict)
    }
    failed = {
        str(tag_value(item, SOP_INSTANCE)): item
        for item in tag_values(answer, FAILED_SOPS)
        if isinstance(item, dict)
    }
    warning = tag_value(answer, WARNING_REASON)
    if datas is None or len(datas) == 1:
        # One instance: the answer is about it, whatever UID it names.
        item = next(iter(stored.values()), None)
        if item is not None:
            return [_stored(item, warning)]
        failure = next(iter(failed.values()), None)
        return [None if failure is None else _failed(failure, status)]
    out: list[Outcome | None] = []
    for data in datas:
        uid = sop_uid_of(data)
        if uid in stored:
            out.append(_stored(stored[uid], warning))
        elif uid in failed:
            out.append(_failed(failed[uid], status))
        else:
            out.append(None)
    return out
