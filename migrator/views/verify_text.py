"""What `migrator verify` prints: per job the totals, the problems (like ``rclone check``:
missing, differing, errored instances), then a verdict naming every kind of row that
keeps the job from being complete, each with what to run about it.
"""

from __future__ import annotations

import shlex
from typing import Any

from migrator.engine.studies import StudyReport
from migrator.states import VerifyResult
from migrator.views.verify_report import PROBLEMS, JobVerification, iso

# How many skip reasons are listed one by one.
TOP_SKIP_REASONS = 5


def render_text(reports: list[JobVerification]) -> str:
    """Human output for every verified job."""
    return "\n\n".join(_job_block(r) for r in reports)


def _job_block(r: JobVerification) -> str:
    t, run = r.totals, r.run
    rate = run.checked / run.elapsed if run.elapsed > 0 else 0.0
    lines = [
        f"job {r.job.name}: verified against {r.target}",
        f"  this pass: checked {run.checked} instances in {run.elapsed:.1f} s "
        f"({rate:.0f}/s)"
        + ("; interrupted: rerun `migrator verify` to carry on" if run.interrupted else ""),
    ]
    if r.pass_state is not None and r.resumed:
        lines.append(
            f"  carried on the pass begun at {iso(r.pass_state.started_at)} "
            f"(`migrator verify --all` begins a new one)"
        )
    present = t.get("present", 0)
    lines.append(
        f"  {t['match']} match, "
        + (f"{present} present (found by UID, bytes not compared), " if present else "")
        + f"{t['missing']} missing, {t['differ']} differ, "
        f"{t['error']} error" + (f", {t['unverified']} not verified yet" if t["unverified"] else "")
    )
    earlier, oldest = r.earlier
    if earlier:
        lines.append(
            f"  {earlier} of the matches were found before this pass (oldest at {iso(oldest)}) "
            f"and not asked again; `migrator verify --all` asks again"
        )
    if r.not_sent:
        parts = ", ".join(f"{s} {n}" for s, n in r.not_sent.items())
        lines.append(f"  not sent, so not verified: {parts}")
    if r.skipped:
        shown = list(r.skipped.items())[:TOP_SKIP_REASONS]
        lines.append("  skipped: " + "; ".join(f"{n} {reason}" for reason, n in shown))
        if len(r.skipped) > TOP_SKIP_REASONS:
            lines.append(f"  ... and {len(r.skipped) - TOP_SKIP_REASONS} other skip reasons")
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
                f"migrator report --job {shlex.quote(r.job.name)} --state {result.value} "
                "--format csv"
            )
    lines += _verdict_lines(r)
    return "\n".join(lines)


def _verdict_lines(r: JobVerification) -> list[str]:
    """`complete: ...`, or `NOT complete: ...` and one line per blocking kind of row."""
    if r.run.interrupted:
        return ["verdict: not known yet: the pass was interrupted; rerun `migrator verify`"]
    blocking = r.blocking
    if not blocking:
        skipped = r.not_sent.get("skipped", 0)
        vanished = r.not_sent.get("vanished", 0)
        extra = f"; {skipped} skipped on purpose" if skipped else ""
        if r.totals.get("present"):
            extra = f", {r.totals['present']} present, bytes not compared" + extra
        if vanished:
            extra += f"; {vanished} vanished from the source, accepted (--accept-vanished)"
        return [
            f"verdict: complete: the target holds every instance of the job "
            f"({r.totals['match']} match{extra})"
        ]
    summary = ", ".join(f"{n} {name}" for name, n in blocking.items())
    lines = [f"verdict: NOT complete: {summary}"]
    for name in blocking:
        # Quoted: job names hold `>` (replicate:a->b), which a shell reads as a redirection.
        lines.append(f"  {name}: {_hint(name, shlex.quote(r.job.name))}")
    return lines


def _hint(name: str, job: str) -> str:
    """What to run about one kind of blocking row."""
    run_again = (
        f"run the job again (`migrator worker --job {job}`, or its replicate/import command)"
    )
    hints = {
        "listing unfinished": f"the source was not fully listed: {run_again}",
        "pending": f"not sent yet: {run_again}",
        "in_flight": "a run is sending them: verify again when it has ended (if no run is "
        f"going on, {run_again})",
        "failed": f"`migrator retry --job {job}`, then {run_again}",
        "rejected": f"the target refused them: `migrator report --job {job} --state rejected` "
        f"says why; once fixed, `migrator retry --job {job} --state rejected`, then {run_again}",
        "vanished": f"the source no longer has them (`migrator report --job {job} --state "
        f"vanished`); if they were deleted there on purpose, `migrator verify --job {job} "
        f"--accept-vanished`",
        "skipped without a sent copy": "skipped in favour of another copy of the instance, "
        f"but no copy was sent: `migrator report --job {job} --state skipped`",
        "missing": f"`migrator retry --job {job} --state missing`, then {run_again}",
        "differ": f"`migrator retry --job {job} --state differ`, then {run_again} "
        "(see the README: the target must accept the new version)",
        "error": "the check could not tell: rerun `migrator verify`",
        "unverified": "sent after this pass read them: rerun `migrator verify`",
        "studies with fewer instances": "the target lost instances of these studies (above)",
        "studies not checked": "the target could not be asked (above): rerun `migrator verify`",
    }
    return hints.get(name, "see `migrator status`")


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
