"""A mirror's passes over deletions on its source (``mirror --reconcile-every``).

Orthanc's change log never records a deletion, so every `DeletionPolicy.every` seconds
the mirror reads the source's inventory (``GET /instances``: every ID, in one answer)
and compares it with the rows it sent before that read: a sent instance the source no
longer holds was deleted there. The ledger records it (`vanished`, "deleted on source");
`status`, the page and `report` show it. With ``--propagate-deletes`` the mirror deletes
it on the target too, at most ``--max-deletes`` per pass: when more wait to be deleted
(a source emptied by mistake), nothing is deleted and the mirror stops with a fatal
error, exit 3, naming the count, so that an operator looks before a mirror is emptied.
Deletions that fail for a retryable reason are tried again at the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from migrator.ends.retrying import with_retries
from migrator.errors import FatalError, Kind, TransferError

if TYPE_CHECKING:
    from migrator.engine.scheduler import Scheduler

log = logging.getLogger("migrator")

# Deletions on the target at once.
PARALLEL = 4


@dataclass(frozen=True)
class DeletionPolicy:
    """How a mirror treats deletions on its source."""

    # Seconds between two comparisons of the source's inventory with the ledger.
    every: float = 3600.0
    # Delete on the target what was deleted on the source.
    propagate: bool = False
    # Most deletions on the target in one pass; more and none is made.
    max_deletes: int = 100


@dataclass
class PassResult:
    """What one pass found and did."""

    found: int = 0
    deleted: int = 0


class DeletionWatch:
    """The passes of one mirror run (called from its following loop)."""

    def __init__(self, scheduler: Scheduler, policy: DeletionPolicy) -> None:
        self.scheduler = scheduler
        self.policy = policy
        # The first pass comes at the first turn of the following loop: deletions made
        # while the mirror was stopped are found at once.
        self.next_at = 0.0
        client = getattr(scheduler.source, "client", None)
        if client is None:
            raise FatalError("deletions are found by reading an Orthanc source's inventory")
        self.client = client
        self.delete = getattr(scheduler.target, "delete", None)
        if policy.propagate and self.delete is None:
            raise FatalError(
                f"--propagate-deletes needs an Orthanc target, not {scheduler.target.kind}"
            )

    async def tick(self) -> PassResult | None:
        """A pass, if one is due."""
        if time.monotonic() < self.next_at:
            return None
        result = await self.run_pass()
        self.next_at = time.monotonic() + self.policy.every
        return result

    async def run_pass(self) -> PassResult:
        """Compare the source's inventory with the sent rows; record and (with
        propagation) delete on the target what the source lost."""
        s = self.scheduler
        ledger, job_id = s.ledger, s.job.id
        result = PassResult()
        # Rows sent before the snapshot began are instances the source held by then.
        before = time.time()
        try:
            held = set(
                await with_retries(self.client.instance_ids, s.settings.retry, "GET /instances")
            )
        except TransferError as exc:
            if exc.verdict.kind is Kind.FATAL:
                raise FatalError(exc.verdict.reason) from None
            log.warning("deletions not checked this time: %s", exc.verdict.reason)
            return result
        sent = await s.db(ledger.sent_keys, job_id, before)
        gone = [row_id for row_id, key in sent if key not in held]
        if gone:
            result.found = await s.db(ledger.mark_deleted_on_source, job_id, gone)
            log.warning(
                "%d instances sent earlier were deleted on the source%s",
                result.found,
                "" if self.policy.propagate else " (kept on the target: see --propagate-deletes)",
            )
        if self.policy.propagate:
            result.deleted = await self._propagate()
        return result

    async def _propagate(self) -> int:
        """Delete on the target the instances deleted on the source, unless more than
        `max_deletes` wait."""
        s = self.scheduler
        todo = await s.db(s.ledger.target_deletions, s.job.id)
        if not todo:
            return 0
        cap = self.policy.max_deletes
        if len(todo) > cap:
            raise FatalError(
                f"{len(todo)} instances deleted on the source wait to be deleted on the "
                f"target, more than --max-deletes {cap}: nothing was deleted. If the source "
                f"lost them by mistake, restore them there (they are sent again); if the "
                f"deletions are wanted, rerun with --max-deletes {len(todo)}"
            )
        assert self.delete is not None
        gate = asyncio.Semaphore(PARALLEL)
        done: list[int] = []

        async def one(row_id: int, key: str) -> None:
            async with gate:
                try:
                    await self.delete(key)  # False: not there, which is as good
                except TransferError as exc:
                    if exc.verdict.kind is Kind.FATAL:
                        raise FatalError(exc.verdict.reason) from None
                    log.warning("deleting %s on the target: %s", key, exc.verdict.reason)
                    return
                done.append(row_id)

        await asyncio.gather(*(one(row_id, key) for row_id, key in todo))
        deleted = await s.db(s.ledger.mark_deleted_on_target, s.job.id, done)
        log.warning("%d instances deleted on the source were deleted on the target", deleted)
        return deleted
