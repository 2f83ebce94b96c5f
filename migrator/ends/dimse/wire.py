"""pynetdicom associations as the DIMSE source and `verify` use them: their reactor held
while an operation reads its answers (`pause_reactor`), their state read while the
reactor is held (`usable`, `settle`), and the C-FIND queries both ends ask. A target's
C-STOREs do without pynetdicom (`migrator.ends.dimse.link`, `migrator.ends.dimse.pdu`).
"""

from __future__ import annotations

import time

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from migrator.errors import Kind, Verdict, verdict_for_dimse_status

__all__ = [
    "FIND_MODEL",
    "find",
    "pause_reactor",
    "query",
    "settle",
    "usable",
]

FIND_MODEL = StudyRootQueryRetrieveInformationModelFind


def usable(assoc: Association) -> bool:
    """Whether an association is established and ready for data: its state machine's
    state, which its network thread keeps even while the reactor is paused (and so has
    not yet turned a peer's abort or release into `is_established` False)."""
    if not assoc.is_established:
        return False
    machine = getattr(assoc.dul, "state_machine", None)
    return getattr(machine, "current_state", "Sta6") == "Sta6"


def settle(assoc: Association) -> None:
    """Let a held reactor see that the peer ended the association (it then marks it
    ended), waiting a moment for it; an association still established is up to the
    caller to abort."""
    if assoc.is_established and not usable(assoc):
        assoc._reactor_checkpoint.set()
        deadline = time.monotonic() + 0.5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.001)


def pause_reactor(assoc: Association) -> None:
    """Hold the association's reactor thread, so that it does not take our response off
    the queue (before a C-STORE here, or pynetdicom's C-FIND, C-GET, C-MOVE, which hold it
    again and let it go when their answer ends). pynetdicom waits for its `_is_paused`
    flag, which is already True for a moment after the reactor passed its checkpoint: the
    response could then be taken (and the store wait for it until the DIMSE timeout, seen
    about once in a thousand stores). Here the wait lasts until the reactor is blocked on
    the checkpoint itself."""
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    deadline = time.monotonic() + 1.0
    while True:
        blocked = len(waiters) > 0 if waiters is not None else assoc._is_paused
        # A reactor that ended (association gone) never blocks: the send then fails.
        if blocked or not assoc.is_alive() or time.monotonic() > deadline:
            return
        time.sleep(0.0001)


def find(assoc: Association, query: Dataset, side: str) -> tuple[list[Dataset], Verdict | None]:
    """A Study Root C-FIND (blocking): the matches, and the classified failure that ended
    the answer early, if any (None: complete)."""
    matches: list[Dataset] = []
    final: int | None = None
    pause_reactor(assoc)
    for status, identifier in assoc.send_c_find(query, FIND_MODEL):
        if not status or "Status" not in status:
            final = None
            break
        final = int(status.Status)
        if final in (0xFF00, 0xFF01):
            if identifier is not None:
                matches.append(identifier)
            continue
        break
    if final == 0x0000:
        return matches, None
    return matches, verdict_for_dimse_status(final, side=side, operation="C-FIND") or Verdict(
        Kind.RETRYABLE, f"{side} C-FIND ended with status 0x{final:04X}"
    )


def query(level: str, **keys: str) -> Dataset:
    """A C-FIND identifier at `level` with these keys (empty: return keys)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


def text(ds: Dataset, keyword: str) -> str:
    """A returned key as text ('' when absent or empty)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip("\0 ")
