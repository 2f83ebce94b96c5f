"""The ledger's side of `migrator verify`: the rows to ask, the results, the totals read
back, the state of a job's verification pass, and putting rows whose copy is missing or
differs back to pending. Mixed into `Ledger`.

A verification pass asks the target about every `sent` row last verified before the
pass's threshold (``since``). Its start and threshold are kept in the job's options
(``verify_pass``), and its end once every row was asked, so that an interrupted pass
(Ctrl-C, crash, kill -9) is carried on by a plain rerun instead of being started again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, case, exists, func, or_, select, text, update

from migrator.ledger.schema import COPY_STATES_SQL, instances, jobs
from migrator.states import State, VerifyResult, check_transition

# The key of a job's options under which its verification pass is kept.
PASS_KEY = "verify_pass"


@dataclass(frozen=True)
class VerifyPassState:
    """A job's latest verification pass, as kept in the ledger."""

    # When the pass began (epoch seconds).
    started_at: float
    # Rows last verified before this are asked in this pass (= started_at for a full pass).
    since: float
    # When every row of the pass had been asked; None while the pass is unfinished.
    finished_at: float | None


def _current() -> Any:
    """A row's verification is about the bytes it holds now: not older than its last send."""
    c = instances.c
    return and_(c.verified_at.is_not(None), or_(c.sent_at.is_(None), c.verified_at >= c.sent_at))


class VerifyMixin:
    """Verification reads and writes (see `migrator.ledger.store.Ledger`)."""

    _read: Any
    _write: Any
    _requeue: Any

    # -- the pass -------------------------------------------------------------------------

    def verify_pass(self, job_id: int) -> VerifyPassState | None:
        """The job's latest verification pass, or None if it was never verified."""
        with self._read() as conn:
            raw = conn.execute(select(jobs.c.options).where(jobs.c.id == job_id)).scalar()
        state = json.loads(raw or "{}").get(PASS_KEY)
        if not isinstance(state, dict):
            return None
        return VerifyPassState(state["started_at"], state["since"], state.get("finished_at"))

    def begin_verify_pass(self, job_id: int, since: float, started_at: float) -> VerifyPassState:
        """Record a new verification pass of the job (replacing any unfinished one)."""
        state = VerifyPassState(started_at, since, None)
        self._set_pass(job_id, state)
        return state

    def end_verify_pass(self, job_id: int, started_at: float) -> None:
        """Mark the pass that began at `started_at` finished (a newer pass is left alone)."""
        current = self.verify_pass(job_id)
        if current is not None and current.started_at == started_at:
            self._set_pass(job_id, VerifyPassState(started_at, current.since, time.time()))

    def _set_pass(self, job_id: int, state: VerifyPassState) -> None:
        # Read and write in one write transaction: the rest of the options stays as it is.
        with self._write() as conn:
            raw = conn.execute(select(jobs.c.options).where(jobs.c.id == job_id)).scalar()
            options = json.loads(raw or "{}")
            options[PASS_KEY] = {
                "started_at": state.started_at,
                "since": state.since,
                "finished_at": state.finished_at,
            }
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(options=json.dumps(options, sort_keys=True))
            )

    # -- rows to ask ----------------------------------------------------------------------

    def verify_page(
        self, job_id: int, after_id: int, since: float | None, limit: int
    ) -> list[tuple[Any, ...]]:
        """The next `sent` rows to ask after `after_id`, in id order (keyset pagination):
        (id, source_key, the target's Orthanc ID, md5, target_status, sop_uid, study_uid,
        series_uid).

        Always rows never verified since they were (last) sent, and rows whose check ended
        in `error`; with `since`, also rows last verified before that time.
        """
        c = instances.c
        stale = [c.verified_at.is_(None), c.verified_at < c.sent_at]
        stale.append(c.verify_result == VerifyResult.ERROR.value)
        if since is not None:
            stale.append(c.verified_at < since)
        query = (
            # The ID the target gave the instance, where it differs from the computed one.
            select(
                c.id,
                c.source_key,
                func.coalesce(c.target_id, c.orthanc_id),
                c.md5,
                c.target_status,
                c.sop_uid,
                c.study_uid,
                c.series_uid,
            )
            # `job_id + 0` keeps SQLite on the primary key from `after_id` (see export.py):
            # through the (job_id, state) index it would sort every sent row for each page.
            .where(
                (c.job_id + 0) == job_id,
                c.state == State.SENT.value,
                c.id > after_id,
                or_(*stale),
            )
            .order_by(c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [tuple(r) for r in conn.execute(query).all()]

    # -- results --------------------------------------------------------------------------

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

    def verification_totals(self, job_id: int) -> dict[str, int]:
        """Sent rows per verify result; `unverified` for rows not verified since last sent."""
        c = instances.c
        bucket = case((_current(), c.verify_result), else_="unverified")
        with self._read() as conn:
            rows = conn.execute(
                select(bucket, func.count())
                .where(c.job_id == job_id, c.state == State.SENT.value)
                .group_by(bucket)
            ).all()
        totals = {r.value: 0 for r in VerifyResult} | {"unverified": 0}
        for name, n in rows:
            totals[name or "unverified"] = totals.get(name or "unverified", 0) + n
        return totals

    def verified_before(self, job_id: int, moment: float) -> tuple[int, float | None]:
        """Sent rows whose current `match` was found before `moment`: how many, and the
        oldest of those checks (results a pass trusted without asking again)."""
        c = instances.c
        with self._read() as conn:
            n, oldest = conn.execute(
                select(func.count(), func.min(c.verified_at)).where(
                    c.job_id == job_id,
                    c.state == State.SENT.value,
                    c.verify_result == VerifyResult.MATCH.value,
                    _current(),
                    c.verified_at < moment,
                )
            ).one()
        return int(n), oldest

    def verification_problems(
        self, job_id: int, result: VerifyResult, limit: int
    ) -> list[dict[str, Any]]:
        """Up to `limit` sent rows with this (current) result, in id order."""
        c = instances.c
        with self._read() as conn:
            rows = conn.execute(
                select(c.source_key, c.orthanc_id, c.sop_uid, c.verify_detail)
                .where(
                    c.job_id == job_id,
                    c.state == State.SENT.value,
                    c.verify_result == result.value,
                    or_(c.sent_at.is_(None), c.verified_at >= c.sent_at),
                )
                .order_by(c.id)
                .limit(limit)
            ).all()
        return [
            {"source_key": key, "orthanc_id": oid, "sop_uid": sop, "detail": detail}
            for key, oid, sop, detail in rows
        ]

    # -- rows that were not sent ----------------------------------------------------------

    def skip_reasons(self, job_id: int) -> dict[str, int]:
        """Skipped rows per reason (`last_error`), most frequent first."""
        c = instances.c
        with self._read() as conn:
            rows = conn.execute(
                select(c.last_error, func.count())
                .where(c.job_id == job_id, c.state == State.SKIPPED.value)
                .group_by(c.last_error)
                .order_by(func.count().desc())
            ).all()
        return {reason or "no reason recorded": int(n) for reason, n in rows}

    def skipped_without_copy(self, job_id: int, prefixes: Sequence[str]) -> int:
        """Skipped rows whose reason starts with one of `prefixes` (another copy stands in
        for them: superseded, header-only) although no copy of their instance is `sent`."""
        c = instances.c
        other = instances.alias("twin")
        twin_sent = exists().where(
            other.c.job_id == c.job_id,
            other.c.orthanc_id == c.orthanc_id,
            # Spelt as the partial index ix_instances_copies is, so that it is used: one
            # lookup per skipped row rather than a scan of the sent rows.
            text(f"twin.{COPY_STATES_SQL}"),
            other.c.state == State.SENT.value,
        )
        with self._read() as conn:
            n = conn.execute(
                select(func.count()).where(
                    c.job_id == job_id,
                    c.state == State.SKIPPED.value,
                    or_(*(c.last_error.startswith(p, autoescape=True) for p in prefixes)),
                    or_(c.orthanc_id.is_(None), ~twin_sent),
                )
            ).scalar_one()
        return int(n)

    def sent_per_study(self, job_id: int) -> tuple[dict[str, int], int]:
        """Distinct Orthanc IDs sent per StudyInstanceUID, and the sent rows without a UID."""
        c = instances.c
        sent = [c.job_id == job_id, c.state == State.SENT.value]
        with self._read() as conn:
            per_study = dict(
                conn.execute(
                    select(c.study_uid, func.count(func.distinct(c.orthanc_id)))
                    .where(*sent, c.study_uid.is_not(None))
                    .group_by(c.study_uid)
                ).all()
            )
            skipped = conn.execute(
                select(func.count()).where(*sent, c.study_uid.is_(None))
            ).scalar_one()
        return per_study, int(skipped)

    # -- repair ---------------------------------------------------------------------------

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
