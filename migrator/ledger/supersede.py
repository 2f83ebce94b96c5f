"""Copies of one instance in a folder job: which copy supersedes which. Mixed into
`Ledger`; it writes through the same transactions, so the ledger stays the only writer
of state.

Only a copy that is actually sent supersedes the others. Copies that are all still
pending are left to the lease (`Ledger.lease(one_per_instance=True)`), which takes one at
a time, best first, so that a refused copy is followed by the next one.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import case, func, select, text, update

from migrator.ledger.schema import COPY_STATES_SQL, instances, pending_again
from migrator.states import State, check_transition

# Built once: aliasing the table copies all its columns, which cost more than the query.
OTHER = instances.alias("other")
# Whether another copy of a row's instance is sent (2) or in flight (1), or NULL: one
# lookup in the partial index ix_instances_copies, whose condition the query spells the
# same way so that it is used. (Not max(state): PostgreSQL turns a bare max into a
# backward scan of the (job_id, state) index.)
TWIN_SENT, TWIN_IN_FLIGHT = 2, 1
TWIN_STATE = (
    select(func.max(case((OTHER.c.state == State.SENT.value, TWIN_SENT), else_=TWIN_IN_FLIGHT)))
    .where(
        OTHER.c.job_id == instances.c.job_id,
        OTHER.c.orthanc_id == instances.c.orthanc_id,
        OTHER.c.id != instances.c.id,
        text(f"other.{COPY_STATES_SQL}"),
    )
    .scalar_subquery()
    .label("twin_state")
)
SUPERSEDED_PREFIX = "superseded:"
SUPERSEDED = f"{SUPERSEDED_PREFIX} another copy of this instance is sent"


class SupersedeMixin:
    """Settling copies of sent instances (see `migrator.ledger.store.Ledger`)."""

    _write: Any

    def skip_superseded(self, job_id: int) -> int:
        """Settle the copies of instances that are sent: every other copy still pending,
        refused, failed or vanished ends skipped as superseded (the instance is on the
        target). Only a copy that is actually sent supersedes: copies that are all still
        pending are left to the lease, which tries them one at a time, best first, so
        that a refused copy is followed by the next one. Copies a past version of this
        tool marked superseded with no sent twin are put back to pending.

        Returns how many pending rows were skipped, less the ones put back (the change
        in the number of rows left to send).
        """
        for old in (State.PENDING, State.REJECTED, State.FAILED, State.VANISHED):
            check_transition(old, State.SKIPPED)
        check_transition(State.SKIPPED, State.PENDING)
        now = time.time()
        sent_twin = (
            select(OTHER.c.id)
            .where(
                OTHER.c.job_id == instances.c.job_id,
                OTHER.c.orthanc_id == instances.c.orthanc_id,
                OTHER.c.id != instances.c.id,
                # Spelled as the partial index's condition, so that it is used.
                text(f"other.{COPY_STATES_SQL}"),
                OTHER.c.state == State.SENT.value,
            )
            .exists()
        )
        mine = [instances.c.job_id == job_id, instances.c.orthanc_id.is_not(None)]
        with self._write() as conn:
            revived = conn.execute(
                update(instances)
                .where(
                    *mine,
                    instances.c.state == State.SKIPPED.value,
                    instances.c.last_error.startswith(SUPERSEDED_PREFIX, autoescape=True),
                    ~sent_twin,
                )
                .values(last_error=None, **pending_again(now))
            ).rowcount
            skipped = conn.execute(
                update(instances)
                .where(*mine, instances.c.state == State.PENDING.value, sent_twin)
                .values(state=State.SKIPPED.value, last_error=SUPERSEDED, updated_at=now)
            ).rowcount
            # A copy the target refused (or that failed or vanished) keeps its own
            # reason after the mark, for the record.
            conn.execute(
                update(instances)
                .where(
                    *mine,
                    instances.c.state.in_(
                        [State.REJECTED.value, State.FAILED.value, State.VANISHED.value]
                    ),
                    sent_twin,
                )
                .values(
                    state=State.SKIPPED.value,
                    last_error=func.coalesce(
                        SUPERSEDED + " (this copy: " + instances.c.last_error + ")", SUPERSEDED
                    ),
                    lease_owner=None,
                    lease_expires=None,
                    updated_at=now,
                )
            )
        return skipped - revived
