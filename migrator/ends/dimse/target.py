"""A DICOM peer as a target: C-STORE, and C-FIND for `verify`.

Each association proposes the presentation contexts the files sent so far needed (SOP
class and transfer syntax from each file's meta, with explicit/implicit VR little endian
fallbacks for uncompressed files): a file that needs a context its association did not
propose makes the next association propose it too (the least recently used are dropped
past 127, DICOM's limit being 128 per association). A context the peer rejected refuses
the files that need it (`rejected`). C-STORE statuses are classified in
`migrator.errors.verdict_for_dimse_status`; `check` can only say whether the peer knows
the SOP Instance UID (`present`), not compare bytes.

The store associations are `link.Link`s, on the event loop; the C-FIND associations of
`check` are pynetdicom's, imported when first asked. A large instance is sent as its
chunks come (`store_stream`), so that memory does not grow with it.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from migrator.config import Settings
from migrator.ends.base import Checked, SentRow, Stored
from migrator.ends.dimse.link import Link, LinkPool, LinkSettings, open_link
from migrator.ends.dimse.pdu import (
    IMPLICIT_LE,
    NATIVE,
    UNCOMPRESSED,
    VERIFICATION,
    FileMeta,
    context_key,
    read_meta,
    syntaxes_for,
)
from migrator.ends.dimse.peer import (
    EXTRA_WAIT,
    MAX_ASSOCIATIONS,
    AssociationPool,
    Connector,
    Peer,
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

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from migrator.ends.streams import Body

__all__ = ["DimseTarget"]

log = logging.getLogger("migrator")

# Presentation contexts one association proposes at most (DICOM allows 128; one is kept
# for C-ECHO).
MAX_CONTEXTS = 127


class DimseTarget:
    """A C-STORE SCP receiving instances."""

    kind = "dimse"
    byte_proof = False

    def __init__(self, peer: Peer, settings: Settings) -> None:
        self.peer = peer
        self.display = peer.display
        self.settings = settings
        self.size = max(1, min(settings.concurrency, MAX_ASSOCIATIONS))
        # Contexts wanted, most recently used last: key -> the transfer syntax proposed first.
        self.wanted: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.stores = LinkPool(peer, "target", self._open_store, self.size)
        self._connector: Connector | None = None
        self._finds: AssociationPool | None = None

    @property
    def finds(self) -> AssociationPool:
        """pynetdicom associations for C-FIND (verify), opened on first use."""
        if self._finds is None:
            self._connector = Connector(self.peer, self.settings, "target", threads=self.size + 2)
            self._finds = AssociationPool(self._connector, self._open_find, max(1, self.size // 2))
        return self._finds

    def _timeouts(self, extra: bool) -> LinkSettings:
        s = self.settings
        # An association beyond the first: a peer that serves fewer at once leaves it
        # unanswered, and the run must not wait long to learn it (`peer.EXTRA_WAIT`).
        acse = min(EXTRA_WAIT, s.connect_timeout) if extra else s.connect_timeout + 20
        return LinkSettings(s.connect_timeout, acse, s.timeout)

    async def preflight(self) -> str:
        """C-ECHO: the peer answers and accepts our AE titles (else FatalError)."""
        contexts = [(VERIFICATION, [IMPLICIT_LE])]
        try:
            link = await open_link(self.peer, "target", contexts, self._timeouts(False))
            try:
                status = await link.echo(self.settings.timeout)
            finally:
                await link.release()
        except TransferError as exc:
            raise FatalError(exc.verdict.reason) from None
        if status != 0:
            raise FatalError(f"target {self.display}: C-ECHO failed")
        return f"target {self.display}: DICOM peer (C-ECHO answered, our AE {self.peer.calling})"

    async def probe(self) -> bool:
        """Whether the peer answers a C-ECHO again, over a pooled association (a peer that
        serves one association at a time would leave a new one unanswered)."""
        try:
            async with self.stores.take() as link:
                status = await link.echo(self.settings.timeout)
                if status is None:
                    raise TransferError(Verdict(Kind.RETRYABLE, "target C-ECHO: no answer"))
        except (TransferError, FatalError):
            return False
        return status == 0

    async def store(self, data: bytes) -> Stored:
        """C-STORE one instance over a pooled association."""
        meta = read_meta(data)
        return await self._store(meta, lambda link: self._store_on(link, data, meta))

    async def store_stream(self, body: Body) -> Stored:
        """C-STORE a large instance as its chunks come: memory holds a few chunks, not the
        instance. One that cannot go as it is (no file meta in its first chunk, or a
        transfer syntax the peer accepted only re-encoded) is gathered whole and stored
        as `store` does."""
        chunks = aiter(body)
        try:
            head = await anext(chunks)
        except StopAsyncIteration:
            head = b""
        meta = read_meta(head)

        async def whole() -> bytes:
            return head + b"".join([chunk async for chunk in chunks])

        if meta is None:
            return await self.store(await whole())

        async def send(link: Link) -> int | None:
            assert meta is not None
            context_id = link.context_id(meta.sop_class, meta.transfer_syntax)
            if context_id is None:
                return await self._store_on(link, await whole(), meta)
            dataset = memoryview(head)[meta.offset :]
            return await link.store_stream(
                context_id,
                meta.sop_class,
                meta.sop_uid,
                dataset,
                chunks,
                body.length - meta.offset,
                self.settings.timeout,
            )

        return await self._store(meta, send)

    async def _store(
        self, meta: FileMeta | None, send: Callable[[Link], Awaitable[int | None]]
    ) -> Stored:
        """Send one instance with `send` over a pooled association that proposed its
        context, and classify the peer's status."""
        key = context_key(meta.sop_class, meta.transfer_syntax) if meta else None
        if key is not None:
            if key not in self.wanted:
                self.wanted[key] = meta.transfer_syntax  # type: ignore[union-attr]
            self.wanted.move_to_end(key)
        for _ in range(2):
            async with self.stores.take() as link:
                if key is not None and key not in link.proposed:
                    # Opened before this file's context was wanted: open one that has it.
                    await link.release()
                    continue
                status = await send(link)
                if status is None:
                    raise TransferError(
                        Verdict(Kind.RETRYABLE, "target C-STORE: association aborted by the peer")
                    )
                break
        else:
            raise TransferError(Verdict(Kind.RETRYABLE, "target: no association with the context"))
        verdict = verdict_for_dimse_status(status, side="target", operation="C-STORE")
        if verdict is not None:
            raise TransferError(verdict)
        warning = dimse_warning(status)
        if warning:
            log.info("target %s stored with a warning: %s", self.display, warning)
        return Stored("Success", None, warning=warning)

    async def _store_on(self, link: Link, data: bytes, meta: FileMeta | None) -> int | None:
        """C-STORE `data` over `link`: the dataset's bytes as they are when the peer
        accepted the file's transfer syntax (no decoding, no re-encoding); otherwise the
        dataset is parsed and re-encoded into an accepted uncompressed syntax (only
        uncompressed files are proposed so). Raises TransferError (permanent) when the
        peer accepted no context for the file."""
        timeout = self.settings.timeout
        if meta is not None:
            context_id = link.context_id(meta.sop_class, meta.transfer_syntax)
            if context_id is not None:
                dataset = memoryview(data)[meta.offset :]
                return await link.store(context_id, meta.sop_class, meta.sop_uid, dataset, timeout)
        context_id, sop_class, sop_uid, encoded = _reencoded(link, data)
        return await link.store(context_id, sop_class, sop_uid, memoryview(encoded), timeout)

    async def _open_store(self, extra: bool = False) -> Link:
        keys = list(self.wanted)[-MAX_CONTEXTS:]
        contexts = [(VERIFICATION, [IMPLICIT_LE])]
        contexts += [(k[0], syntaxes_for(k, self.wanted[k])) for k in keys]
        link = await open_link(self.peer, "target", contexts, self._timeouts(extra))
        link.proposed = set(keys)
        for sop_class, group in keys:
            if group != "native" and (sop_class, group) in link.rejected:
                log.info("target %s refuses SOP class %s in %s", self.display, sop_class, group)
        return link

    def _open_find(self, extra: bool = False) -> Association:
        from pynetdicom.presentation import build_context

        from migrator.ends.dimse.wire import FIND_MODEL

        assert self._connector is not None
        return self._connector.associate([build_context(FIND_MODEL)], extra=extra)

    async def check(self, row: SentRow) -> Checked:
        """Whether the peer knows the row's SOP Instance UID (C-FIND at IMAGE level)."""
        if not (row.sop_uid and row.study_uid and row.series_uid):
            return VerifyResult.ERROR, "no study/series/SOP Instance UIDs recorded for this row"
        from migrator.ends.dimse.wire import query, text

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
        from migrator.ends.dimse.wire import query, text

        q = query("STUDY", StudyInstanceUID=study_uid, NumberOfStudyRelatedInstances="")
        matches = await self._find(q)
        if not matches:
            return 0
        value = text(matches[0], "NumberOfStudyRelatedInstances")
        return int(value) if value.isdigit() else None

    async def _find(self, q: Any) -> list[Any]:
        from migrator.ends.dimse.wire import find

        finds = self.finds
        assert self._connector is not None
        async with finds.take() as assoc:
            matches, verdict = await self._connector.run(find, assoc, q, "target")
            if verdict is not None:
                raise TransferError(verdict)
            return matches

    async def aclose(self) -> None:
        """Release the associations and stop the threads."""
        await self.stores.aclose()
        if self._finds is not None:
            await self._finds.aclose()
        if self._connector is not None:
            self._connector.close()


def _reencoded(link: Link, data: bytes) -> tuple[int, str, str, bytes]:
    """The file's dataset parsed (pydicom) and encoded in a transfer syntax the peer
    accepted for its SOP class: (context ID, SOP class, SOP instance, bytes)."""
    from pydicom import dcmread
    from pynetdicom.dsutils import encode

    try:
        dataset = dcmread(io.BytesIO(data), force=True)
        sop_class = str(dataset.SOPClassUID)
        sop_uid = str(dataset.SOPInstanceUID)
        ts = str(dataset.file_meta.TransferSyntaxUID)
    except Exception as exc:
        raise TransferError(
            Verdict(Kind.PERMANENT, f"cannot read the file to send it: {exc}")
        ) from None
    accepted = link.syntaxes(sop_class)
    syntax = next((t for t in (ts, *NATIVE) if t in accepted), None)
    if syntax is None or (syntax != ts and ts not in UNCOMPRESSED):
        raise TransferError(
            Verdict(
                Kind.PERMANENT,
                f"target accepts no presentation context for SOP class {sop_class} in "
                f"transfer syntax {_name(ts)}",
            )
        )
    try:
        encoded = encode(dataset, syntax == IMPLICIT_LE, True)
    except Exception as exc:
        encoded = None
        log.debug("encoding in %s failed: %s", syntax, exc)
    if encoded is None:
        raise TransferError(Verdict(Kind.PERMANENT, f"cannot encode the file in {_name(syntax)}"))
    return accepted[syntax], sop_class, sop_uid, encoded


def _name(ts: str) -> str:
    """A transfer syntax's name (its UID when pydicom does not know it)."""
    from pydicom.uid import UID

    return UID(ts).name
