"""The ledger's settling of files held back while a folder is listed. Mixed into `Ledger`;
it writes through the same transactions, so the ledger stays the only writer of state.

A file without pixel data may be a header-only copy of an instance (never to be sent) or
a valid instance without pixels (to be sent): only the whole listing tells which. The
folder source lists such files `skipped` with a "held" reason; once the listing is
complete, :meth:`CopiesMixin.settle_held_copies` decides each one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update

from migrator.ledger.schema import instances, pending_again
from migrator.states import State, check_transition


class CopiesMixin:
    """Held copies (see `migrator.ledger.store.Ledger`)."""

    _write: Any

    def settle_held_copies(self, job_id: int, held: Mapping[str, str]) -> int:
        """Settle the rows skipped with one of the ``held`` reasons (a mapping of each held
        reason to its final one): a row whose instance has a copy with pixel data in the
        job stays skipped, with the final reason; every other one becomes pending, to be
        sent. Call it only once the listing is complete. Returns how many became pending.
        """
        if not held:
            return 0
        check_transition(State.SKIPPED, State.PENDING)
        now = time.time()
        c = instances.c
        with_pixels = select(c.orthanc_id).where(
            c.job_id == job_id, c.has_pixels.is_(True), c.orthanc_id.is_not(None)
        )
        is_held = [c.job_id == job_id, c.state == State.SKIPPED.value]
        with self._write() as conn:
            for reason, final in held.items():
                # One pass over the job's copies with pixel data, not one lookup per row:
                # the ledger has no index on Orthanc IDs in every state.
                conn.execute(
                    update(instances)
                    .where(*is_held, c.last_error == reason, c.orthanc_id.in_(with_pixels))
                    .values(last_error=final, updated_at=now)
                )
            released = conn.execute(
                update(instances)
                .where(*is_held, c.last_error.in_(list(held)))
                .values(last_error=None, **pending_again(now))
            ).rowcount
        return released
