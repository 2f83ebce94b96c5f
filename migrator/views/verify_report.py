"""The `migrator verify` command as a library call, its verdict and its exit code.

`verify_jobs` checks each selected job against its target (the `VerifyPass` of
`migrator.engine.verify`, then the per-study counts of `migrator.engine.studies`) and returns one
`JobVerification` per job. Totals are read back from the ledger, so they cover every
row of the job, including rows verified by earlier (possibly interrupted) runs.

Each run belongs to a verification pass, kept in the ledger: a plain `verify` carries on
the job's unfinished pass, or else begins a new one that asks the target about every
sent row again (a result from an earlier pass says nothing about a target wiped since).
``--max-age`` trusts matches younger than that, ``--since`` those found after a time.

A job is complete, and `verify` exits 0, only when every row of a fully listed job is
`sent` and matched in this pass (or skipped on purpose); everything else is named in
`JobVerification.blocking`, with what to run about it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from migrator.config import Settings
from migrator.ends.base import Target
from migrator.ends.factory import open_target
from migrator.engine.studies import StudyReport, check_studies
from migrator.engine.verify import PassResult, VerifyPass
from migrator.errors import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, UsageError
from migrator.ledger.queries import job_counts
from migrator.ledger.store import Job, Ledger
from migrator.ledger.verification import VerifyPassState
from migrator.states import State, VerifyResult

log = logging.getLogger("migrator")

DEFAULT_CONCURRENCY = 16
PROGRESS_EVERY = 5.0
PROBLEMS = (VerifyResult.MISSING, VerifyResult.DIFFER, VerifyResult.ERROR)
# Skipped rows that are fine only while another copy of the same instance is sent: the
# starts of the reasons `Ledger.skip_superseded` and `fileclass` write.
STAND_IN_REASONS = ("superseded", "header-only copy", "copy without pixel data")
# States of rows that keep a job from being complete (vanished unless accepted).
UNSENT_BLOCKING = (State.PENDING, State.IN_FLIGHT, State.FAILED, State.REJECTED)


@dataclass
class JobVerification:
    """The state of one job's verification after a run."""

    job: Job
    target: str
    run: PassResult
    totals: dict[str, int]
    not_sent: dict[str, int]
    studies: StudyReport | None
    problems: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    pass_state: VerifyPassState | None = None
    resumed: bool = False
    # Matches found before this pass began (trusted, not asked again): count, oldest.
    earlier: tuple[int, float | None] = (0, None)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_without_copy: int = 0
    accept_vanished: bool = False

    @property
    def blocking(self) -> dict[str, int]:
        """What keeps the job from being complete: name -> count, in the order to fix it."""
        out: dict[str, int] = {}
        if not self.job.listing_done:
            out["listing unfinished"] = 1
        for state in UNSENT_BLOCKING:
            out[state.value] = self.not_sent.get(state.value, 0)
        if not self.accept_vanished:
            out[State.VANISHED.value] = self.not_sent.get(State.VANISHED.value, 0)
        out["skipped without a sent copy"] = self.skipped_without_copy
        for result in PROBLEMS:
            out[result.value] = self.totals[result.value]
        out["unverified"] = self.totals["unverified"]
        if self.studies is not None:
            out["studies with fewer instances"] = len(self.studies.fewer)
            out["studies not checked"] = len(self.studies.errors)
        return {name: n for name, n in out.items() if n}

    @property
    def complete(self) -> bool:
        """True when the target holds every instance of the job that was not skipped on
        purpose (and the pass was not interrupted)."""
        return not self.run.interrupted and not self.blocking

    @property
    def failed(self) -> bool:
        """True when the job is not complete."""
        return not self.complete

    def as_json(self) -> dict[str, Any]:
        """One entry of ``verify --json``'s ``jobs`` list."""
        p = self.pass_state
        return {
            "name": self.job.name,
            "kind": self.job.kind,
            "target": self.target,
            "complete": self.complete,
            "blocking": self.blocking,
            **self.totals,
            "checked": self.run.checked,
            "elapsed": round(self.run.elapsed, 3),
            "interrupted": self.run.interrupted,
            "pass": {
                "started_at": iso(p.started_at) if p else None,
                "since": iso(p.since) if p else None,
                "finished": bool(p and p.finished_at is not None),
                "resumed": self.resumed,
            },
            "matched_before_pass": {"count": self.earlier[0], "oldest": iso(self.earlier[1])},
            "not_sent": self.not_sent,
            "skipped": self.skipped,
            "vanished_accepted": self.accept_vanished,
            "listing_done": self.job.listing_done,
            "studies": self.studies.as_json() if self.studies else None,
            "problems": self.problems,
        }


def parse_since(text: str) -> float:
    """An ISO 8601 time (UTC unless it says otherwise) or epoch seconds, as epoch seconds."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"--since {text!r}: give an ISO 8601 time or epoch seconds") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        value = moment.timestamp()
    # float() takes "nan", "inf" and "-5": none of them is a time a check happened at.
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--since {text!r}: give an ISO 8601 time or epoch seconds (not negative)")
    return value


_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str, option: str = "--max-age") -> float:
    """A duration such as 3600, 90s, 30m, 12h, 7d or 2w, in seconds (`option` names it
    in the error)."""
    match = _AGE.fullmatch(text)
    if match is None:
        raise UsageError(f"{option} {text!r}: give a duration such as 30m, 12h or 7d")
    value = float(match.group(1)) * _AGE_UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise UsageError(f"{option} {text!r}: give a duration such as 30m, 12h or 7d")
    return value


def iso(epoch: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-11-28T10:00:00.123Z``), None stays None."""
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def verification_totals(ledger: Ledger, job_id: int) -> dict[str, int]:
    """Sent rows per verify result; `unverified` for rows not verified since last sent."""
    return ledger.verification_totals(job_id)


def plan_pass(
    ledger: Ledger, job: Job, *, since: float | None, max_age: float | None, fresh: bool
) -> tuple[VerifyPassState, bool]:
    """The pass this run belongs to, recorded in the ledger, and whether it is resumed.

    An explicit `since` or `max_age`, or `fresh` (``--all``), begins a new pass; without
    them the job's unfinished pass is carried on, or a new one asks every sent row.
    """
    now = time.time()
    if since is None and max_age is None and not fresh:
        current = ledger.verify_pass(job.id)
        if current is not None and current.finished_at is None:
            return current, True
    threshold = since if since is not None else now - (max_age or 0.0)
    return ledger.begin_verify_pass(job.id, threshold, now), False


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
    target: Target,
    *,
    concurrency: int,
    since: float | None = None,
    max_age: float | None = None,
    fresh: bool = False,
    accept_vanished: bool = False,
    studies: bool = True,
    max_list: int = 1000,
    progress: bool = True,
) -> JobVerification:
    """Verify one job against `target` (already preflighted)."""
    pass_state, resumed = await asyncio.to_thread(
        plan_pass, ledger, job, since=since, max_age=max_age, fresh=fresh
    )
    if resumed:
        log.info(
            "verify %s: carrying on the pass begun at %s", job.name, iso(pass_state.started_at)
        )
    else:
        log.info(
            "verify %s: asking about every sent row last checked before %s "
            "(if interrupted, a rerun carries on)",
            job.name,
            iso(pass_state.since),
        )
    verify_pass = VerifyPass(
        ledger,
        job,
        target,
        concurrency=concurrency,
        since=pass_state.since,
        on_result=_progress_logger(job) if progress else None,
    )
    run = await verify_pass.run()
    if not run.interrupted:
        await asyncio.to_thread(ledger.end_verify_pass, job.id, pass_state.started_at)
        pass_state = await asyncio.to_thread(ledger.verify_pass, job.id) or pass_state
    study_report = None
    if studies and not run.interrupted:
        study_report = await check_studies(ledger, job.id, target, concurrency)
    return await asyncio.to_thread(
        _read_back,
        ledger,
        job,
        target.display,
        run,
        study_report,
        pass_state,
        resumed,
        accept_vanished,
        max_list,
    )


def _read_back(
    ledger: Ledger,
    job: Job,
    target: str,
    run: PassResult,
    study_report: StudyReport | None,
    pass_state: VerifyPassState,
    resumed: bool,
    accept_vanished: bool,
    max_list: int,
) -> JobVerification:
    """The job's verification as the ledger has it now."""
    job = ledger.get_job(job.name) or job  # the listing may have finished meanwhile
    totals = ledger.verification_totals(job.id)
    counts = job_counts(ledger, job.id)
    not_sent = {s: n for s, n in counts.items() if n and s != State.SENT.value}
    problems = {
        result.value: ledger.verification_problems(job.id, result, max_list)
        if totals[result.value]
        else []
        for result in PROBLEMS
    }
    return JobVerification(
        job,
        target,
        run,
        totals,
        not_sent,
        study_report,
        problems,
        pass_state=pass_state,
        resumed=resumed,
        earlier=ledger.verified_before(job.id, pass_state.started_at),
        skipped=ledger.skip_reasons(job.id) if not_sent.get(State.SKIPPED.value) else {},
        skipped_without_copy=ledger.skipped_without_copy(job.id, STAND_IN_REASONS)
        if not_sent.get(State.SKIPPED.value)
        else 0,
        accept_vanished=accept_vanished,
    )


def verify_jobs(
    settings: Settings,
    *,
    job_name: str | None = None,
    target_url: str | None = None,
    concurrency: int | None = None,
    since: float | None = None,
    max_age: float | None = None,
    fresh: bool = False,
    accept_vanished: bool = False,
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
        options = {
            "concurrency": concurrency or DEFAULT_CONCURRENCY,
            "since": since,
            "max_age": max_age,
            "fresh": fresh,
            "accept_vanished": accept_vanished,
            "studies": studies,
            "max_list": max_list,
            "progress": progress,
        }
        return asyncio.run(_verify_all(ledger, selected, settings, target_url, options))
    finally:
        ledger.close()


async def _verify_all(
    ledger: Ledger,
    selected: list[Job],
    settings: Settings,
    target_url: str | None,
    options: dict[str, Any],
) -> list[JobVerification]:
    reports = []
    for job in selected:
        target = open_target(target_url or job.target, settings)
        if target_url and target.display != job.target:
            log.warning("job %s was sent to %s; verifying %s", job.name, job.target, target.display)
        try:
            await target.preflight()
            report = await verify_job(ledger, job, target, **options)
        finally:
            await target.aclose()
        reports.append(report)
        if report.run.interrupted:
            break
    return reports


def exit_code(reports: list[JobVerification]) -> int:
    """130 interrupted; 0 when every job is complete; 1 otherwise."""
    if any(r.run.interrupted for r in reports):
        return EXIT_INTERRUPTED
    return EXIT_OK if all(r.complete for r in reports) else EXIT_INCOMPLETE
