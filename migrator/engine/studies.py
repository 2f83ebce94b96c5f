"""Per-study counts: the instances the ledger has as sent vs what the target holds.

A second opinion beside the per-instance MD5 check, through another part of Orthanc's
API: a study whose count on the target is lower than the number of distinct instances
sent lost some (storage recycling deletes whole patients); a higher count means the
target holds instances the job did not send (older data, or copies it transcoded under
new IDs), which is reported but is not a failure.

Rows carry a StudyInstanceUID when the listing could read one (folder imports and REST
listings record them; a file without one, or an instance deleted from a REST source while
it was listed, has none): rows without one are skipped and counted. The
Orthanc study ID hashes the PatientID too, which the ledger does not keep: studies are
found with ``POST /tools/lookup`` on the UID (one UID may even sit under two patients).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from migrator.config import RetryPolicy
from migrator.ends.base import Target
from migrator.ends.retrying import with_retries
from migrator.errors import (
    FatalError,
    Kind,
    TransferError,
)
from migrator.ledger.store import Ledger

# A passing network error must not turn into a study reported as unknown.
RETRY = RetryPolicy(max_attempts=4, backoff_initial=0.2, backoff_max=1.0)


@dataclass
class StudyReport:
    """Outcome of the per-study count check of one job."""

    checked: int = 0
    # Studies with fewer instances on the target than sent: each {"study_uid", "sent", "target"}.
    fewer: list[dict[str, Any]] = field(default_factory=list)
    # Studies with more instances on the target than sent (informational).
    more: list[dict[str, Any]] = field(default_factory=list)
    # Studies the target could not be asked about: {"study_uid", "error"}.
    errors: list[dict[str, Any]] = field(default_factory=list)
    # Sent rows without a StudyInstanceUID in the ledger (not part of the check).
    skipped_rows: int = 0

    def as_json(self) -> dict[str, Any]:
        """The `studies` object of `verify --json`."""
        return {
            "checked": self.checked,
            "fewer": self.fewer,
            "more": self.more,
            "errors": self.errors,
            "skipped_rows": self.skipped_rows,
        }


async def check_studies(
    ledger: Ledger, job_id: int, target: Target, concurrency: int
) -> StudyReport:
    """Compare per-study counts for one job; FatalError (auth, outage) propagates."""
    per_study, skipped = await asyncio.to_thread(ledger.sent_per_study, job_id)
    report = StudyReport(skipped_rows=skipped)
    gate = asyncio.Semaphore(concurrency)

    async def one(study_uid: str, sent: int) -> None:
        async with gate:
            try:
                held = await with_retries(
                    lambda: target.study_count(study_uid), RETRY, f"study {study_uid}"
                )
            except TransferError as exc:
                if exc.verdict.kind is Kind.FATAL:
                    raise FatalError(exc.verdict.reason) from None
                report.errors.append({"study_uid": study_uid, "error": exc.verdict.reason})
                return
        if held is None:
            return  # a target that cannot count per study (a DIMSE peer without C-FIND)
        report.checked += 1
        entry = {"study_uid": study_uid, "sent": sent, "target": held}
        if held < sent:
            report.fewer.append(entry)
        elif held > sent:
            report.more.append(entry)

    await asyncio.gather(*(one(uid, n) for uid, n in per_study.items()))
    for items in (report.fewer, report.more, report.errors):
        items.sort(key=lambda e: e["study_uid"])
    return report
