"""The `migrator verify` command as a library call, and what it prints.

`verify_jobs` checks each selected job against its target (the `VerifyPass` of
`migrator.verify`, then the per-study counts of `migrator.studies`) and returns one
`JobVerification` per job. Totals are read back from the ledger, so they cover every
sent row of the job, including rows verified by earlier (possibly interrupted) passes.
The text output follows ``rclone check``: totals first, then the missing, differing and
errored instances.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select

from migrator.app import endpoint_from
from migrator.config import Settings
from migrator.errors import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, UsageError
from migrator.ledger import Job, Ledger
from migrator.orthanc import OrthancClient
from migrator.reports import job_counts
from migrator.schema import instances
from migrator.states import State, VerifyResult
from migrator.studies import StudyReport, check_studies
from migrator.verify import PassResult, VerifyPass

log = logging.getLogger("migrator")

DEFAULT_CONCURRENCY = 16
PROGRESS_EVERY = 5.0
PROBLEMS = (VerifyResult.MISSING, VerifyResult.DIFFER, VerifyResult.ERROR)


@dataclass
class JobVerification:
    """The state of one job's verification after a pass."""

    job: Job
    target: str
    run: PassResult
    totals: dict[str, int]
    not_sent: dict[str, int]
    studies: StudyReport | None
    problems: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """True when something is missing, differs, errored or a study lost instances."""
        if any(self.totals[r.value] for r in PROBLEMS):
            return True
        return self.studies is not None and bool(self.studies.fewer or self.studies.errors)

    def as_json(self) -> dict[str, Any]:
        """One entry of ``verify --json``'s ``jobs`` list."""
        return {
            "name": self.job.name,
            "kind": self.job.kind,
            "target": self.target,
            **self.totals,
            "checked": self.run.checked,
            "elapsed": round(self.run.elapsed, 3),
            "interrupted": self.run.interrupted,
            "not_sent": self.not_sent,
            "studies": self.studies.as_json() if self.studies else None,
            "problems": self.problems,
        }


def parse_since(text: str) -> float:
    """An ISO 8601 time (UTC unless it says otherwise) or epoch seconds, as epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: give an ISO 8601 time or epoch seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(epoch: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-11-28T10:00:00.123Z``), None stays None."""
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def verification_totals(ledger: Ledger, job_id: int) -> dict[str, int]:
    """Sent rows per verify result; `unverified` for rows not verified since last sent."""
    c = instances.c
    current = and_(c.verified_at.is_not(None), or_(c.sent_at.is_(None), c.verified_at >= c.sent_at))
    bucket = case((current, c.verify_result), else_="unverified")
    with ledger._read() as conn:
        rows = conn.execute(
            select(bucket, func.count())
            .where(c.job_id == job_id, c.state == State.SENT.value)
            .group_by(bucket)
        ).all()
    totals = {r.value: 0 for r in VerifyResult} | {"unverified": 0}
    for name, n in rows:
        totals[name or "unverified"] = totals.get(name or "unverified", 0) + n
    return totals


def problem_rows(
    ledger: Ledger, job_id: int, result: VerifyResult, limit: int
) -> list[dict[str, Any]]:
    """Up to `limit` rows with this (current) result, in id order."""
    c = instances.c
    with ledger._read() as conn:
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


def _progress_logger(job: Job) -> Any:
    state = {"n": 0, "last": time.monotonic(), "start": time.monotonic()}

    def on_result(_result: VerifyResult) -> None:
        state["n"] += 1
        now = time.monotonic()
        if now - state["last"] >= PROGRESS_EVERY:
            state["last"] = now
            rate = state["n"] / max(now - state["start"], 1e-6)
            log.info("verify %s: %d checked (%.0f/s)", job.name, state["n"], rate)

    return on_result


async def verify_job(
    ledger: Ledger,
    job: Job,
    client: OrthancClient,
    *,
    concurrency: int,
    since: float | None,
    studies: bool = True,
    max_list: int = 1000,
    progress: bool = True,
) -> JobVerification:
    """Verify one job against the target behind `client` (already preflighted)."""
    verify_pass = VerifyPass(
        ledger,
        job,
        client,
        concurrency=concurrency,
        since=since,
        on_result=_progress_logger(job) if progress else None,
    )
    run = await verify_pass.run()
    study_report = None
    if studies and not run.interrupted:
        study_report = await check_studies(ledger, job.id, client, concurrency)
    totals = await asyncio.to_thread(verification_totals, ledger, job.id)
    counts = await asyncio.to_thread(job_counts, ledger, job.id)
    not_sent = {s: n for s, n in counts.items() if n and s != State.SENT.value}
    problems = {}
    for result in PROBLEMS:
        problems[result.value] = (
            await asyncio.to_thread(problem_rows, ledger, job.id, result, max_list)
            if totals[result.value]
            else []
        )
    return JobVerification(
        job, client.endpoint.display, run, totals, not_sent, study_report, problems
    )


def verify_jobs(
    settings: Settings,
    *,
    job_name: str | None = None,
    target_url: str | None = None,
    concurrency: int | None = None,
    since: float | None = None,
    studies: bool = True,
    max_list: int = 1000,
    progress: bool = True,
) -> list[JobVerification]:
    """Verify the named job, or every job of the ledger (`migrator verify`).

    Raises FatalError (exit 3) when a target is unreachable or refuses the credentials.
    """
    ledger = Ledger.open(settings.ledger, create=False)
    try:
        if job_name is not None:
            job = ledger.get_job(job_name)
            if job is None:
                known = ", ".join(j.name for j in ledger.list_jobs()) or "none"
                raise UsageError(f"no job named {job_name!r} in the ledger (jobs: {known})")
            selected = [job]
        else:
            selected = ledger.list_jobs()
            if not selected:
                raise UsageError("the ledger has no jobs yet")
        if target_url and len({j.target for j in selected}) > 1:
            raise UsageError("--target-url applies to one target: name the job with --job")
        width = concurrency or DEFAULT_CONCURRENCY
        return asyncio.run(
            _verify_all(
                ledger, selected, settings, target_url, width, since, studies, max_list, progress
            )
        )
    finally:
        ledger.close()


async def _verify_all(
    ledger: Ledger,
    selected: list[Job],
    settings: Settings,
    target_url: str | None,
    concurrency: int,
    since: float | None,
    studies: bool,
    max_list: int,
    progress: bool,
) -> list[JobVerification]:
    reports = []
    for job in selected:
        endpoint = endpoint_from(target_url or job.target, "target", settings)
        if endpoint.url != endpoint_from(job.target, "target", settings).url:
            log.warning(
                "job %s was sent to %s; verifying %s", job.name, job.target, endpoint.display
            )
        client = OrthancClient(
            endpoint,
            "target",
            connections=concurrency + 2,
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
        )
        try:
            await client.system()
            report = await verify_job(
                ledger,
                job,
                client,
                concurrency=concurrency,
                since=since,
                studies=studies,
                max_list=max_list,
                progress=progress,
            )
        finally:
            await client.aclose()
        reports.append(report)
        if report.run.interrupted:
            break
    return reports


def exit_code(reports: list[JobVerification]) -> int:
    """130 interrupted; 1 anything missing, differing, errored; 0 all match."""
    if any(r.run.interrupted for r in reports):
        return EXIT_INTERRUPTED
    return EXIT_INCOMPLETE if any(r.failed for r in reports) else EXIT_OK


def render_text(reports: list[JobVerification]) -> str:
    """Human output: per job the totals, then the lists of problems (like rclone check)."""
    blocks = []
    for r in reports:
        t, run = r.totals, r.run
        rate = run.checked / run.elapsed if run.elapsed > 0 else 0.0
        lines = [
            f"job {r.job.name}: verified against {r.target}",
            f"  this pass: checked {run.checked} instances in {run.elapsed:.1f} s "
            f"({rate:.0f}/s)" + ("; interrupted: rerun to resume" if run.interrupted else ""),
            f"  {t['match']} match, {t['missing']} missing, {t['differ']} differ, "
            f"{t['error']} error"
            + (f", {t['unverified']} not verified yet" if t["unverified"] else ""),
        ]
        if r.not_sent:
            parts = ", ".join(f"{s} {n}" for s, n in r.not_sent.items())
            lines.append(f"  not sent, so not verified: {parts} (see `migrator status`)")
        lines += _study_lines(r.studies)
        for result in PROBLEMS:
            total = t[result.value]
            if not total:
                continue
            listed = r.problems.get(result.value, [])
            lines.append(f"{result.value} ({total}):")
            for p in listed:
                lines.append("  " + _problem_line(p, result))
            if total > len(listed):
                lines.append(
                    f"  ... and {total - len(listed)} more: "
                    f"migrator report --job {r.job.name} --state {result.value} --format csv"
                )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _problem_line(problem: dict[str, Any], result: VerifyResult) -> str:
    """`orthanc-id  [source key]  [detail]` (the key only when it is not the ID)."""
    parts = [problem["orthanc_id"] or "-"]
    if problem["source_key"] != problem["orthanc_id"]:
        parts.append(problem["source_key"])
    if problem["detail"] and result is not VerifyResult.MISSING:
        parts.append(problem["detail"])
    return "  ".join(parts)


def _study_lines(studies: StudyReport | None) -> list[str]:
    if studies is None:
        return ["  studies: not checked"]
    lines = [
        f"  studies: {studies.checked} checked, {len(studies.fewer)} with fewer instances "
        f"on the target than sent, {len(studies.more)} with more"
    ]
    if studies.skipped_rows:
        lines.append(
            f"  studies: skipped {studies.skipped_rows} sent rows without a StudyInstanceUID "
            f"in the ledger (per-instance checks still cover them)"
        )
    for e in studies.fewer:
        lines.append(f"  study {e['study_uid']}: sent {e['sent']}, target holds {e['target']}")
    for e in studies.more:
        lines.append(
            f"  study {e['study_uid']}: sent {e['sent']}, target holds {e['target']} "
            f"(other or transcoded instances)"
        )
    for e in studies.errors:
        lines.append(f"  study {e['study_uid']}: could not check: {e['error']}")
    return lines
