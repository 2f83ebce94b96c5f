"""A DICOM peer as a target: C-STORE, and C-FIND for `verify`.

Each association proposes the presentation contexts the files sent so far needed (SOP
class and transfer syntax from each file's meta, with explicit/implicit VR little endian
fallbacks for uncompressed files): a file that needs a context its association did not
propose makes the next association propose it too (the least recently used are dropped
past 127, DICOM's limit being 128 per association). A context the peer rejected refuses
the files that need it (`rejected`). C-STORE statuses are classified in
`migrator.errors.verdict_for_dimse_status`; `check` can only say whether the peer knows
the SOP Instance UID (`present`), not compare bytes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from migrator.config import Settings
from migrator.ends.base import Checked, SentRow, Stored
from migrator.ends.dimse.peer import (
    MAX_ASSOCIATIONS,
    AssociationPool,
    Connector,
    Peer,
    check_association,
)
from migrator.ends.dimse.wire import (
    FIND_MODEL,
    context_for,
    context_key,
    find,
    query,
    quicken,
    read_meta,
    settle,
    store_bytes,
    text,
)
from migrator.errors import (
    FatalError,
    Kind,
    TransferError,
    Verdict,
    dimse_warning,
    verdict_for_dimse_status,
)
from migrator.states import VerifyResult

__all__ = ["DimseTarget"]

log = logging.getLogger("migrator")

# Presentation contexts one association proposes at most (DICOM allows 128; one is kept
# for C-ECHO).
MAX_CONTEXTS = 127


class DimseTarget:
    """A C-STORE SCP receiving instances."""

    kind = "dimse"
    streams = False
    byte_proof = False

    def __init__(self, peer: Peer, settings: Settings) -> None:
        self.peer = peer
        self.display = peer.display
        size = max(1, min(settings.concurrency, MAX_ASSOCIATIONS))
        self.connector = Connector(peer, settings, "target", threads=size + 2)
        # Contexts wanted, most recently used last: key -> the transfer syntax proposed first.
        self.wanted: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.stores = AssociationPool(self.connector, self._open_store, size)
        self.finds = AssociationPool(self.connector, self._open_find, max(1, size // 2))

    async def preflight(self) -> str:
        """C-ECHO: the peer answers and accepts our AE titles (else FatalError)."""
        try:
            await self.connector.run(self._echo)
        except TransferError as exc:
            raise FatalError(exc.verdict.reason) from None
        return f"target {self.display}: DICOM peer (C-ECHO answered, our AE {self.peer.calling})"

    def _echo(self) -> None:
        assoc = self.connector.associate([build_context(Verification)])
        try:
            status = assoc.send_c_echo()
            check_association(assoc, "target", "C-ECHO")
            if "Status" not in status or int(status.Status) != 0:
                raise TransferError(Verdict(Kind.RETRYABLE, "target C-ECHO failed"))
        finally:
            if assoc.is_established:
                assoc.release()

    async def probe(self) -> bool:
        """Whether the peer answers a C-ECHO again, over a pooled association (a peer that
        serves one association at a time would leave a new one unanswered)."""
        try:
            async with self.stores.take() as assoc:
                status = await self.connector.run(assoc.send_c_echo)
                check_association(assoc, "target", "C-ECHO")
        except (TransferError, FatalError):
            return False
        return "Status" in status and int(status.Status) == 0

    async def store(self, data: bytes) -> Stored:
        """C-STORE one instance over a pooled association."""
        meta = read_meta(data)
        key = context_key(meta.sop_class, meta.transfer_syntax) if meta else None
        if key is not None:
            if key not in self.wanted:
                self.wanted[key] = meta.transfer_syntax  # type: ignore[union-attr]
            self.wanted.move_to_end(key)
        for _ in range(2):
            async with self.stores.take() as assoc:
                if key is not None and key not in assoc.proposed:
                    # Opened before this file's context was wanted: open one that has it.
                    await self.connector.run(_release, assoc)
                    continue
                status = await self.connector.run(store_bytes, assoc, data, meta)
                if status is None:
                    check_association(assoc, "target", "C-STORE")
                break
        else:
            raise TransferError(Verdict(Kind.RETRYABLE, "target: no association with the context"))
        verdict = verdict_for_dimse_status(status, side="target", operation="C-STORE")
        if verdict is not None:
            raise TransferError(verdict)
        assert status is not None
        warning = dimse_warning(status)
        if warning:
            log.info("target %s stored with a warning: %s", self.display, warning)
        return Stored("Success", None, warning=warning)

    def _open_store(self, extra: bool = False) -> Association:
        keys = list(self.wanted)[-MAX_CONTEXTS:]
        contexts: list[PresentationContext] = [build_context(Verification)]
        contexts += [context_for(k, self.wanted[k]) for k in keys]
        assoc = self.connector.associate(contexts, extra=extra)
        quicken(assoc)
        assoc.proposed = set(keys)  # type: ignore[attr-defined]
        rejected = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.rejected_contexts}
        for sop_class, group in keys:
            if group != "native" and (sop_class, group) in rejected:
                log.info(
                    "target %s refuses SOP class %s in %s", self.display, sop_class, UID(group).name
                )
        return assoc

    def _open_find(self, extra: bool = False) -> Association:
        return self.connector.associate([build_context(FIND_MODEL)], extra=extra)

    async def check(self, row: SentRow) -> Checked:
        """Whether the peer knows the row's SOP Instance UID (C-FIND at IMAGE level)."""
        if not (row.sop_uid and row.study_uid and row.series_uid):
            return VerifyResult.ERROR, "no study/series/SOP Instance UIDs recorded for this row"
        q = query(
            "IMAGE",
            StudyInstanceUID=row.study_uid,
            SeriesInstanceUID=row.series_uid,
            SOPInstanceUID=row.sop_uid,
        )
        try:
            matches = await self._find(q)
        except TransferError as exc:
            if exc.verdict.kind is Kind.FATAL:
                raise FatalError(exc.verdict.reason) from None
            return VerifyResult.ERROR, exc.verdict.reason
        if any(text(m, "SOPInstanceUID") == row.sop_uid for m in matches):
            return VerifyResult.PRESENT, "found by C-FIND (SOP Instance UID), bytes not compared"
        return VerifyResult.MISSING, "not on the target (C-FIND)"

    async def study_count(self, study_uid: str) -> int | None:
        """NumberOfStudyRelatedInstances of the study, if the peer tells it."""
        q = query("STUDY", StudyInstanceUID=study_uid, NumberOfStudyRelatedInstances="")
        matches = await self._find(q)
        if not matches:
            return 0
        value = text(matches[0], "NumberOfStudyRelatedInstances")
        return int(value) if value.isdigit() else None

    async def _find(self, q: Any) -> list[Any]:
        async with self.finds.take() as assoc:
            matches, verdict = await self.connector.run(find, assoc, q, "target")
            if verdict is not None:
                raise TransferError(verdict)
            return matches

    async def aclose(self) -> None:
        """Release the associations and stop the threads."""
        await self.stores.aclose()
        await self.finds.aclose()
        self.connector.close()


def _release(assoc: Association) -> None:
    settle(assoc)
    if assoc.is_established:
        assoc.release()
