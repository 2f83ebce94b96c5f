"""The ledger's record of instances a mirror found deleted on its source. Mixed into
`Ledger`; it writes through the same transactions, so the ledger stays the only writer
of state.

Orthanc's change log never records deletions: a mirror compares the source's inventory
with the rows it sent. A sent row whose instance the source no longer holds becomes
`vanished` with the reason `DELETED_ON_SOURCE`; once the mirror deleted it on the target
too (``--propagate-deletes``), the reason becomes `DELETED_ON_TARGET`. Listed again
(stored anew on the source), the row is pending again, as any vanished row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update

from migrator.ledger.schema import instances
from migrator.states import State, check_transition

# Reasons (`last_error`) of the rows of instances deleted on the source after they were
# sent: not yet deleted on the target, and deleted there too.
DELETED_ON_SOURCE = "deleted on source"
DELETED_ON_TARGET = "deleted on source, and on the target"
# Ids per statement: well under every database's limit of bound parameters.
CHUNK = 500


class DeletionsMixin:
    """Deletions on a mirror's source (see `migrator.ledger.store.Ledger`)."""

    _write: Any
    _read: Any

    def sent_keys(self, job_id: int, sent_before: float) -> list[tuple[int, str]]:
        """(id, source key) of the job's rows sent before `sent_before` (epoch seconds):
        the instances the source held before that moment."""
        c = instances.c
        with self._read() as conn:
            return [
                (row_id, key)
                for row_id, key in conn.execute(
                    select(c.id, c.source_key).where(
                        c.job_id == job_id,
                        c.state == State.SENT.value,
                        c.sent_at < sent_before,
                    )
                )
            ]

    def mark_deleted_on_source(self, job_id: int, ids: Sequence[int]) -> int:
        """Sent rows among `ids` become vanished, deleted on the source; how many."""
        check_transition(State.SENT, State.VANISHED)
        return self._set_reason(job_id, ids, State.SENT.value, None, state=State.VANISHED.value)

    def target_deletions(self, job_id: int) -> list[tuple[int, str]]:
        """(id, Orthanc ID on the target) of the rows deleted on the source and not yet
        on the target."""
        c = instances.c
        with self._read() as conn:
            rows = conn.execute(
                select(c.id, func.coalesce(c.target_id, c.orthanc_id, c.source_key))
                .where(
                    c.job_id == job_id,
                    c.state == State.VANISHED.value,
                    c.last_error == DELETED_ON_SOURCE,
                )
                .order_by(c.id)
            ).all()
        return [(row_id, key) for row_id, key in rows]

    def mark_deleted_on_target(self, job_id: int, ids: Sequence[int]) -> int:
        """Rows among `ids`, deleted on the source, are now deleted on the target too."""
        return self._set_reason(job_id, ids, State.VANISHED.value, DELETED_ON_SOURCE)

    def deletion_counts(self, job_id: int) -> dict[str, int]:
        """Rows deleted on the source: in all, and of those, deleted on the target."""
        c = instances.c
        with self._read() as conn:
            counts = dict(
                conn.execute(
                    select(c.last_error, func.count())
                    .where(
                        c.job_id == job_id,
                        c.state == State.VANISHED.value,
                        c.last_error.in_([DELETED_ON_SOURCE, DELETED_ON_TARGET]),
                    )
                    .group_by(c.last_error)
                ).all()
            )
        on_target = counts.get(DELETED_ON_TARGET, 0)
        return {"on_source": counts.get(DELETED_ON_SOURCE, 0) + on_target, "on_target": on_target}

    def _set_reason(
        self,
        job_id: int,
        ids: Sequence[int],
        expected: str,
        expected_reason: str | None,
        **values: Any,
    ) -> int:
        """Rows among `ids` still in state `expected` (and with `expected_reason`, if
        given) take the next reason (and `values`), in one transaction; how many."""
        reason = DELETED_ON_SOURCE if expected_reason is None else DELETED_ON_TARGET
        c = instances.c
        now = time.time()
        changed = 0
        with self._write() as conn:
            for at in range(0, len(ids), CHUNK):
                where = [c.job_id == job_id, c.id.in_(ids[at : at + CHUNK]), c.state == expected]
                if expected_reason is not None:
                    where.append(c.last_error == expected_reason)
                changed += conn.execute(
                    update(instances)
                    .where(*where)
                    .values(last_error=reason, updated_at=now, **values)
                ).rowcount
        return changed
