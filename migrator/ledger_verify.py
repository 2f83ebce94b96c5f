"""The ledger's writes for `migrator verify`: verification results, and putting rows whose
copy is missing or differs back to pending. Mixed into `Ledger`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, update

from migrator.schema import instances
from migrator.states import State, VerifyResult, check_transition


class VerifyMixin:
    """Verification results (see `migrator.ledger.Ledger`)."""

    _write: Any
    _requeue: Any

    def record_verification(self, results: Sequence[tuple[int, VerifyResult, str | None]]) -> None:
        """Store a batch of (row id, result, detail) in one transaction.

        Only rows still `sent` are touched: a row retried meanwhile must not keep a
        verdict about bytes that are about to be sent again.
        """
        if not results:
            return
        now = time.time()
        stmt = (
            update(instances)
            .where(instances.c.id == bindparam("b_id"), instances.c.state == State.SENT.value)
            .values(
                verify_result=bindparam("b_result"),
                verify_detail=bindparam("b_detail"),
                verified_at=now,
            )
        )
        params = [
            {"b_id": row_id, "b_result": VerifyResult(result).value, "b_detail": detail}
            for row_id, result, detail in results
        ]
        with self._write() as conn:
            conn.execute(stmt, params)

    def retry_verification(
        self, job_id: int, results: Sequence[VerifyResult], error_contains: str | None = None
    ) -> int:
        """Put `sent` rows whose verification found `results` (missing, differ) back to
        pending, clearing the verification, so that the next run sends them again."""
        check_transition(State.SENT, State.PENDING)
        conditions = [
            instances.c.job_id == job_id,
            instances.c.state == State.SENT.value,
            instances.c.verify_result.in_([VerifyResult(r).value for r in results]),
        ]
        if error_contains:
            conditions.append(instances.c.verify_detail.contains(error_contains, autoescape=True))
        return self._requeue(conditions, verify_result=None, verify_detail=None, verified_at=None)
