"""The library's entry points, one function per job kind; the CLI is a thin layer over them.

Each function opens what it needs, checks both ends, creates or resumes the job, runs the
scheduler and returns a `JobReport` whose `exit_code` follows the documented convention.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy.exc import SQLAlchemyError

from migrator.config import Settings
from migrator.endpoints import redact, shown_url
from migrator.ends.base import Source, Target
from migrator.ends.factory import (
    end_kind,
    endpoint_from,
    open_source,
    open_target,
    orthanc_client,
)
from migrator.engine.deletions import DeletionPolicy
from migrator.engine.progress import NullProgress, make_progress
from migrator.engine.scheduler import RunResult, Scheduler
from migrator.errors import (
    EXIT_FATAL,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    FatalError,
    LedgerError,
    UsageError,
)
from migrator.ledger.order import ORDER_LISTING, ORDER_NEWEST
from migrator.ledger.queries import job_counts
from migrator.ledger.store import Job, Ledger, make_owner
from migrator.selection import ORDERS, Selection, SelectionFlags
from migrator.units import human_bytes

if TYPE_CHECKING:
    from migrator.engine.diff import Diff

log = logging.getLogger("migrator")


@dataclass
class JobReport:
    """The outcome of one command run on a job."""

    job: Job
    result: RunResult
    counts: dict[str, int]
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        """0 all sent; 1 some rejected/failed/left; 3 fatal; 130 interrupted."""
        if self.result.fatal:
            return EXIT_FATAL
        if self.result.interrupted:
            return EXIT_INTERRUPTED
        if self.dry_run:
            return EXIT_OK
        if self.counts["rejected"] or self.counts["failed"]:
            return EXIT_INCOMPLETE
        if self.counts["pending"] or self.counts["in_flight"]:
            return EXIT_INCOMPLETE
        return EXIT_OK

    def summary(self) -> str:
        """A few lines for the end of a run."""
        r, c = self.result, self.counts
        lines = []
        if self.dry_run:
            lines.append(
                f"dry run: {c['pending']} instances would be sent "
                f"({c['sent']} already sent, {c['skipped']} skipped); nothing was sent"
            )
        else:
            lines.append(
                f"this run: sent {r.sent} ({human_bytes(r.bytes)}) in {r.elapsed:.1f} s, "
                f"rejected {r.rejected}, failed {r.failed}, vanished {r.vanished}, "
                f"retries {r.retries}"
            )
        lines.append(
            f"job {self.job.name}: " + ", ".join(f"{state} {count}" for state, count in c.items())
        )
        if r.fatal:
            lines.append(f"stopped: {r.fatal}")
        elif r.interrupted:
            lines.append("interrupted: rerun the same command to resume")
        elif c["rejected"] or c["failed"]:
            lines.append("see `migrator status` for the reasons, `migrator retry` to try again")
        return "\n".join(lines)


def default_job_name(kind: str, source: str, target: str) -> str:
    """A stable name from the two ends, so that rerunning a command resumes its job."""

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._:/-]+", "_", text).strip("/_")

    return f"{kind}:{clean(source)}->{clean(target)}"


def urlpath(url: str) -> str:
    """The path of a URL without its trailing slash ('' for the root)."""
    return urlsplit(url).path.rstrip("/")


def end_name(url: str | None, role: str, settings: Settings) -> str:
    """How an end appears in a default job name: ``host:port/path`` for an Orthanc (as
    job names always were), the URL without credentials or the path otherwise."""
    url = url or getattr(settings, f"{role}_url") or ""
    kind = end_kind(url, role) if url else "orthanc"
    if kind == "orthanc":
        endpoint = endpoint_from(url, role, settings)
        return endpoint.host_port + urlpath(endpoint.url)
    if kind == "folder":
        if role == "target":
            # Checked before any end is reached: a bad target URL is a usage error.
            raise UsageError(f"target URL {shown_url(url)!r} has no scheme: use http://host:port/")
        return url
    return redact(url).replace(":***@", "@")


async def preflight_ends(source: Source, target: Target, *, source_checked: bool = False) -> None:
    """Make sure each end answers and accepts us (FatalError otherwise), and refuse a
    source and a target that are one Orthanc under two URLs. `source_checked`: the
    source was preflighted already (an import reads its folder's kind first)."""
    if not source_checked:
        log.info(await source.preflight())
    log.info(await target.preflight())
    client = getattr(source, "client", None)
    if client is None or target.kind != "orthanc":
        return
    # Imported here: the HTTP client is not needed by runs between other ends.
    from migrator.ends.orthanc.identity import same_orthanc

    if await same_orthanc(client, target.client):  # type: ignore[attr-defined]
        raise UsageError(
            f"source {source.display} and target {target.display} are the same Orthanc: "
            "give another target"
        )


async def run_job(
    ledger: Ledger,
    source: Source,
    target: Target,
    settings: Settings,
    *,
    job_name: str,
    options: dict[str, Any],
    dry_run: bool = False,
    show_progress: bool = True,
    follow: float | None = None,
    deletions: DeletionPolicy | None = None,
) -> JobReport:
    """Create or resume the job on ends already preflighted (`preflight_ends`) and run it
    to the end (with `follow`, keep listing new source data every `follow` seconds until
    stopped, and look for deletions on the source as `deletions` says)."""
    job = await asyncio.to_thread(
        ledger.ensure_job, job_name, source.kind, source.display, target.display, options
    )
    _same_selection(job, options)
    if bool(job.options.get("only_missing")) != bool(options.get("only_missing")):
        # A job's rows are either everything or the delta: mixing them would tell neither.
        with_flag = "with" if job.options.get("only_missing") else "without"
        raise UsageError(
            f"job {job.name!r} was created {with_flag} --only-missing; choose another --job name"
        )
    progress = make_progress(settings.progress) if show_progress else NullProgress()
    scheduler = Scheduler(
        ledger,
        job,
        source,
        target,
        settings,
        owner=make_owner(),
        progress=progress,
        follow=follow,
        deletions=deletions,
    )
    try:
        result = await (scheduler.list_only() if dry_run else scheduler.run())
    finally:
        progress.close()
    try:
        counts = await asyncio.to_thread(job_counts, ledger, job.id)
    except SQLAlchemyError as exc:
        # The ledger went away during the run (which stopped because of it): say why in
        # one line rather than fail on the closing count.
        raise LedgerError(
            result.fatal or f"ledger {ledger.display_url} cannot be read: {exc.__class__.__name__}"
        ) from None
    return JobReport(job, result, counts, dry_run=dry_run)


def replicate(
    source_url: str | None,
    target_url: str | None,
    settings: Settings,
    *,
    job_name: str | None = None,
    dry_run: bool = False,
    show_progress: bool = True,
    only_missing: bool = False,
    selection: SelectionFlags | None = None,
    order: str | None = None,
) -> JobReport:
    """Copy every instance of a server (Orthanc REST, DICOMweb, DIMSE) into a target
    through the ledger (`migrator replicate`); with `only_missing`, only the source's
    instances the target lacks (two Orthancs' inventories compared, `migrator diff`)."""
    source_url = _require(source_url, "source", settings)
    target_url = _require(target_url, "target", settings)
    if end_kind(source_url) == "folder":
        raise UsageError(
            f"source URL {shown_url(source_url)!r} has no scheme: use http://host:port/ "
            f"(a folder is imported with `migrator import`)"
        )
    if end_kind(source_url) == "database":
        raise UsageError("an index database is imported with `migrator import`")
    options: dict[str, Any] = {"concurrency": settings.concurrency}
    source = None
    if only_missing:
        _both_orthanc(source_url, target_url, "--only-missing")
        options["only_missing"] = True
    kind = "missing" if only_missing else "replicate"
    if only_missing and selection is not None and selection != SelectionFlags():
        raise UsageError("--only-missing sends the whole delta: give no selection with it")
    name = _checked_job_name(kind, source_url, target_url, settings, job_name)
    choose_selection(settings, name, options, selection, order)
    if only_missing:
        from migrator.engine.diff import open_delta_source

        source = open_delta_source(source_url, target_url, settings)
    return _run_with_ledger(
        settings,
        source_url,
        target_url,
        name=name,
        options=options,
        dry_run=dry_run,
        show_progress=show_progress,
        source=source,
    )


def choose_selection(
    settings: Settings,
    name: str,
    options: dict[str, Any],
    flags: SelectionFlags | None,
    order: str | None,
) -> None:
    """Put the job's selection and lease order in `options`. A new job takes the
    selection `flags` make today and `order` (default newest first); an existing job
    keeps its own, and refuses other flags: its rows would mix two selections. Relative
    dates (``--since 2y``) count from the day the job was created, so that the same
    command, rerun later, names the same job."""
    if order is not None and order not in ORDERS:
        raise UsageError(f"--order {order!r}: give one of {', '.join(ORDERS)}")
    existing = _existing_job(settings, name)
    today = date.fromtimestamp(existing.created_at) if existing else date.today()
    selection = (flags or SelectionFlags()).resolve(today)
    if existing is None:
        if not selection.empty:
            options["selection"] = selection.to_options()
        options["order"] = order or ORDER_NEWEST
        return
    stored = Selection.from_options(existing.options.get("selection"))
    if stored != selection:
        raise UsageError(
            f"job {name!r} selects {stored.describe()}, this command {selection.describe()}: "
            "give the job's selection again, or choose another --job name"
        )
    stored_order = existing.options.get("order") or ORDER_LISTING
    if order is not None and order != stored_order:
        raise UsageError(
            f"job {name!r} takes its rows in {stored_order} order, not {order}: "
            "give no --order, or choose another --job name"
        )
    for key in ("selection", "order"):
        if key in existing.options:
            options[key] = existing.options[key]


def _existing_job(settings: Settings, name: str) -> Job | None:
    """The job called `name` in the settings' ledger, if both exist (nothing is created)."""
    try:
        ledger = Ledger.open(settings.ledger)
    except UsageError:  # no ledger yet: a new job
        return None
    try:
        return ledger.get_job(name)
    finally:
        ledger.close()


def _same_selection(job: Job, options: dict[str, Any]) -> None:
    """Refuse to run a job with another selection than its own (see `choose_selection`)."""
    stored = Selection.from_options(job.options.get("selection"))
    given = Selection.from_options(options.get("selection"))
    if stored != given:
        raise UsageError(
            f"job {job.name!r} selects {stored.describe()}, this command {given.describe()}: "
            "choose another --job name"
        )


def _both_orthanc(source_url: str, target_url: str, what: str) -> None:
    """Refuse `what` unless both ends are Orthanc REST APIs (inventories are read there)."""
    if end_kind(source_url) != "orthanc" or end_kind(target_url) != "orthanc":
        raise UsageError(f"{what} compares two Orthancs' inventories: give two http(s):// URLs")


def diff(
    source_url: str | None,
    target_url: str | None,
    settings: Settings,
    *,
    selection: Selection | None = None,
    max_list: int = 1000,
) -> Diff:
    """Compare two Orthancs' inventories (`migrator diff`): what the target lacks, what
    only the target holds, per study; nothing is written anywhere."""
    source_url = _require(source_url, "source", settings)
    target_url = _require(target_url, "target", settings)
    _both_orthanc(source_url, target_url, "diff")

    from migrator.engine.diff import diff_servers

    async def main() -> Diff:
        source = orthanc_client(endpoint_from(source_url, "source", settings), "source", settings)
        target = orthanc_client(endpoint_from(target_url, "target", settings), "target", settings)
        try:
            return await diff_servers(
                source, target, settings.retry, selection=selection, max_list=max_list
            )
        finally:
            await source.aclose()
            await target.aclose()

    return asyncio.run(main())


def _require(url: str | None, role: str, settings: Settings) -> str:
    url = url or getattr(settings, f"{role}_url")
    if not url:
        raise UsageError(f"no {role} URL given (argument or [{role}] url in the config)")
    return str(url)


def _checked_job_name(
    kind: str, source_url: str, target_url: str, settings: Settings, job_name: str | None
) -> str:
    """The job's name (from the ends by default)."""
    source_name = end_name(source_url, "source", settings)
    target_name = end_name(target_url, "target", settings)
    if source_name == target_name:
        raise UsageError("source and target are the same URL")
    return job_name or default_job_name(kind, source_name, target_name)


def _run_with_ledger(
    settings: Settings,
    source_url: str,
    target_url: str,
    *,
    name: str,
    options: dict[str, Any],
    dry_run: bool = False,
    show_progress: bool = True,
    follow: float | None = None,
    source: Source | None = None,
    source_checked: bool = False,
    deletions: DeletionPolicy | None = None,
    ledger: Ledger | None = None,
) -> JobReport:
    """Open and preflight both ends, then run the job in `ledger` (a worker joining it),
    or in the settings' ledger, opened (or created) only then; all in one event loop: an
    end that does not answer leaves no new ledger behind, and each end is asked once."""

    async def main() -> JobReport:
        src = source or open_source(source_url, settings, options=options)
        try:
            target = open_target(target_url, settings)
        except BaseException:
            await src.aclose()
            raise
        try:
            if options.get("selection") and getattr(src, "selection", None) is None:
                # A source that would list everything must not fill a job that says otherwise.
                raise UsageError(f"{src.display} cannot select studies: give no selection for it")
            await preflight_ends(src, target, source_checked=source_checked)
            used = ledger or await asyncio.to_thread(Ledger.open, settings.ledger, create=True)
            try:
                return await run_job(
                    used,
                    src,
                    target,
                    settings,
                    job_name=name,
                    options=options,
                    dry_run=dry_run,
                    show_progress=show_progress,
                    follow=follow,
                    deletions=deletions,
                )
            finally:
                if ledger is None:
                    used.close()
        finally:
            await src.aclose()
            await target.aclose()

    return asyncio.run(main())


def mirror(
    source_url: str | None,
    target_url: str | None,
    settings: Settings,
    *,
    job_name: str | None = None,
    poll: float = 2.0,
    show_progress: bool = True,
    deletions: DeletionPolicy | None = None,
    selection: SelectionFlags | None = None,
    order: str | None = None,
) -> JobReport:
    """Copy everything, then keep following the source's change log (`migrator mirror`).

    Runs until stopped (Ctrl-C, SIGTERM) or a fatal error; the change position lives in
    the ledger, so a restart continues where it stopped. `deletions` says how often the
    source's inventory is compared with what was sent, and whether instances deleted on
    the source are deleted on the target (`migrator.engine.deletions`).
    """
    if poll <= 0:
        raise UsageError("--poll must be positive")
    deletions = deletions or DeletionPolicy()
    if deletions.every <= 0:
        raise UsageError("--reconcile-every must be positive")
    if deletions.max_deletes < 0:
        raise UsageError("--max-deletes must be 0 or more")
    source_url = _require(source_url, "source", settings)
    target_url = _require(target_url, "target", settings)
    if end_kind(source_url) != "orthanc":
        raise UsageError("mirror follows an Orthanc's change log: the source must be http(s)://")
    if deletions.propagate and end_kind(target_url) != "orthanc":
        raise UsageError(
            "--propagate-deletes deletes through Orthanc's REST API: the target must be http(s)://"
        )
    name = _checked_job_name("replicate", source_url, target_url, settings, job_name)
    options: dict[str, Any] = {"concurrency": settings.concurrency}
    choose_selection(settings, name, options, selection, order)
    return _run_with_ledger(
        settings,
        source_url,
        target_url,
        name=name,
        options=options,
        show_progress=show_progress,
        follow=poll,
        deletions=deletions,
    )


def work(
    job_name: str,
    settings: Settings,
    *,
    show_progress: bool = True,
) -> JobReport:
    """Join an existing job and drain it beside other workers (`migrator worker`).

    The job's ends come from the ledger (without passwords); credentials come from the
    config file or the environment.
    """
    ledger = Ledger.open(settings.ledger)
    try:
        job = ledger.get_job(job_name)
        if job is None:
            known = ", ".join(j.name for j in ledger.list_jobs()) or "none"
            raise UsageError(f"no job named {job_name!r} in the ledger (jobs: {known})")
        source = None
        if job.options.get("only_missing"):
            # Should the listing still be under way, this worker lists the delta too.
            from migrator.engine.diff import open_delta_source

            source = open_delta_source(job.source, job.target, settings)
        return _run_with_ledger(
            settings,
            job.source,
            job.target,
            name=job.name,
            options=job.options,
            show_progress=show_progress,
            source=source,
            ledger=ledger,
        )
    finally:
        ledger.close()


def import_path(
    path: str,
    target_url: str | None,
    settings: Settings,
    *,
    job_name: str | None = None,
    dry_run: bool = False,
    show_progress: bool = True,
    storage: str | None = None,
    force: bool = False,
    selection: SelectionFlags | None = None,
    order: str | None = None,
) -> JobReport:
    """Import an Orthanc storage folder, any folder of DICOM files, or a stopped
    Orthanc's index database (`migrator import`).

    ``storage`` is the folder holding the attachment files of an Orthanc index (``path``)
    when it is not the index's own folder. ``force`` reads an index database that an
    Orthanc still holds (not kept with the job: each run says it again).
    """
    kind = end_kind(path, "source")
    if kind not in ("folder", "database"):
        raise UsageError(f"{redact(path)} is a server: use `migrator replicate` for it")
    options: dict[str, Any] = {"concurrency": settings.concurrency}
    if storage:
        # A worker joining the job reads the files from the same place.
        options["storage"] = storage
    source = open_source(path, settings, options={**options, "force": force})
    target_url = _require(target_url, "target", settings)
    name = job_name or default_job_name(
        "import", source.display, end_name(target_url, "target", settings)
    )
    choose_selection(settings, name, options, selection, order)
    if options.get("selection"):
        # Opened again to list only the selected studies (the first one closed: a
        # database source holds a connection).
        asyncio.run(source.aclose())
        source = open_source(path, settings, options={**options, "force": force})
    asyncio.run(source.preflight())
    folder_kind = getattr(getattr(source, "info", None), "kind", None)
    if folder_kind is not None:
        options["folder_kind"] = folder_kind
        if storage:
            options["storage"] = source.info.storage  # type: ignore[attr-defined]
    report = _run_with_ledger(
        settings,
        path,
        target_url,
        name=name,
        options=options,
        dry_run=dry_run,
        show_progress=show_progress,
        source=source,
        source_checked=True,
    )
    if report.job.listing_done or report.result.listed:
        wanted = sum(report.counts[k] for k in ("pending", "in_flight", "sent", "rejected"))
        if not wanted and not report.counts["failed"] and report.counts["skipped"]:
            raise UsageError(
                f"{path} holds no DICOM instance to send ({report.counts['skipped']} files "
                f"skipped: see `migrator status --job {name}`)"
            )
    return report


def prioritize(
    ledger: Ledger,
    job: Job,
    settings: Settings,
    *,
    study: str | None = None,
    patient: str | None = None,
    since: str | None = None,
) -> int:
    """`migrator prioritize`: move the job's pending rows of a study, of a patient's
    studies (asked of an Orthanc source: the ledger knows studies, not patients) or of
    the studies since a date ahead of the others; returns how many rows moved."""
    if sum(x is not None for x in (study, patient, since)) != 1:
        raise UsageError("give one of --study, --patient or --since")
    if since is not None:
        bound = SelectionFlags(since=since).resolve(date.today()).since
        return ledger.prioritize(job.id, since=bound)
    if study is not None:
        return ledger.prioritize(job.id, study_uids={study})
    assert patient is not None
    if end_kind(job.source) != "orthanc":
        raise UsageError(
            f"--patient asks an Orthanc source for the patient's studies; {job.source} is "
            "not one: give --study UID"
        )
    uids = asyncio.run(_patient_studies(job.source, settings, patient))
    if not uids:
        raise UsageError(f"the source {job.source} holds no study of patient {patient!r}")
    return ledger.prioritize(job.id, study_uids=uids)


async def _patient_studies(source_url: str, settings: Settings, patient: str) -> set[str]:
    """The StudyInstanceUIDs of one patient's studies on an Orthanc."""
    from migrator.ends.orthanc.uids import UidLookup

    client = orthanc_client(endpoint_from(source_url, "source", settings), "source", settings)
    try:
        ids = await client.find_study_ids({"PatientID": patient})
        studies = await UidLookup(client, settings.retry).describe(ids, "studies")
    finally:
        await client.aclose()
    found = ((s.get("MainDicomTags") or {}).get("StudyInstanceUID") for s in studies)
    return {uid for uid in found if uid}


__all__ = [
    "FatalError",
    "JobReport",
    "diff",
    "import_path",
    "mirror",
    "prioritize",
    "replicate",
    "run_job",
    "work",
]
