"""The library's entry points, one function per job kind; the CLI is a thin layer over them.

Each function opens what it needs, checks both ends, creates or resumes the job, runs the
scheduler and returns a `JobReport` whose `exit_code` follows the documented convention.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.exc import SQLAlchemyError

from migrator.config import Settings
from migrator.endpoints import Endpoint, parse_endpoint
from migrator.errors import (
    EXIT_FATAL,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    FatalError,
    LedgerError,
    UsageError,
)
from migrator.identity import same_orthanc
from migrator.ledger import Job, Ledger, make_owner
from migrator.orthanc import OrthancClient
from migrator.preflight import warn_about_target
from migrator.progress import NullProgress, make_progress
from migrator.reports import job_counts
from migrator.scheduler import RunResult, Scheduler
from migrator.sources import RestSource, Source
from migrator.units import human_bytes

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


def endpoint_from(url: str | None, role: str, settings: Settings) -> Endpoint:
    """Build an endpoint from the command line or config, with credentials from settings."""
    url = url or getattr(settings, f"{role}_url")
    if not url:
        raise UsageError(f"no {role} URL given (argument or [{role}] url in the config)")
    endpoint = parse_endpoint(url, role=role)
    endpoint = endpoint.with_credentials(
        getattr(settings, f"{role}_username"), getattr(settings, f"{role}_password")
    )
    ca_file = getattr(settings, f"{role}_ca_file")
    return replace(endpoint, ca_file=ca_file) if ca_file else endpoint


def default_job_name(kind: str, source: str, target: Endpoint) -> str:
    """A stable name from the two ends, so that rerunning a command resumes its job."""

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._:/-]+", "_", text).strip("/_")

    return f"{kind}:{clean(source)}->{clean(target.host_port + urlpath(target.url))}"


def urlpath(url: str) -> str:
    """The path of a URL without its trailing slash ('' for the root)."""
    return urlsplit(url).path.rstrip("/")


def check_endpoints(settings: Settings, **endpoints: Endpoint) -> None:
    """Make sure each endpoint is an Orthanc that accepts us, before anything is written:
    an unreachable or wrong server must not leave a new ledger behind."""

    async def check() -> None:
        for role, endpoint in endpoints.items():
            client = make_client(endpoint, role, settings)
            try:
                await client.system()
            finally:
                await client.aclose()

    asyncio.run(check())


def make_client(endpoint: Endpoint, role: str, settings: Settings) -> OrthancClient:
    """A REST client sized for the run's concurrency."""
    return OrthancClient(
        endpoint,
        role,
        connections=settings.concurrency + 2,
        timeout=settings.timeout,
        connect_timeout=settings.connect_timeout,
    )


async def run_job(
    ledger: Ledger,
    source: Source,
    target: OrthancClient,
    settings: Settings,
    *,
    job_name: str,
    options: dict[str, Any],
    dry_run: bool = False,
    show_progress: bool = True,
    follow: float | None = None,
) -> JobReport:
    """Preflight both ends, then create or resume the job and run it to the end (with
    `follow`, keep listing new source data every `follow` seconds until stopped)."""
    log.info(await source.preflight())
    info = await target.system()
    log.info("target %s: Orthanc %s (%s)", target.endpoint.display, info.version, info.name)
    warn_about_target(info.raw, target.endpoint.display)
    job = await asyncio.to_thread(
        ledger.ensure_job, job_name, source.kind, source.display, target.endpoint.display, options
    )
    progress = make_progress(settings.progress) if show_progress else NullProgress()
    scheduler = Scheduler(
        ledger, job, source, target, settings, owner=make_owner(), progress=progress, follow=follow
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


def _rest_ends(
    source_url: str | None, target_url: str | None, settings: Settings, job_name: str | None
) -> tuple[Endpoint, Endpoint, str]:
    """Both ends of a REST job, checked, and the job's name (from the URLs by default)."""
    source_ep = endpoint_from(source_url, "source", settings)
    target_ep = endpoint_from(target_url, "target", settings)
    if source_ep.url == target_ep.url:
        raise UsageError("source and target are the same URL")
    name = job_name or default_job_name(
        "replicate", source_ep.host_port + urlpath(source_ep.url), target_ep
    )
    check_endpoints(settings, source=source_ep, target=target_ep)
    check_distinct(settings, source_ep, target_ep)
    return source_ep, target_ep, name


def check_distinct(settings: Settings, source_ep: Endpoint, target_ep: Endpoint) -> None:
    """Refuse a source and a target that are one Orthanc under two URLs (`localhost` and
    `127.0.0.1`, a proxy and its server): every instance would be "sent" to itself."""

    async def check() -> bool:
        source = make_client(source_ep, "source", settings)
        target = make_client(target_ep, "target", settings)
        try:
            return await same_orthanc(source, target)
        finally:
            await source.aclose()
            await target.aclose()

    if asyncio.run(check()):
        raise UsageError(
            f"source {source_ep.display} and target {target_ep.display} are the same "
            f"Orthanc: give another target"
        )


def replicate(
    source_url: str | None,
    target_url: str | None,
    settings: Settings,
    *,
    job_name: str | None = None,
    dry_run: bool = False,
    show_progress: bool = True,
) -> JobReport:
    """Replicate one Orthanc into another through the ledger (`migrator replicate`)."""
    source_ep, target_ep, name = _rest_ends(source_url, target_url, settings, job_name)
    ledger = Ledger.open(settings.ledger, create=True)
    try:
        return _run_rest(
            ledger,
            source_ep,
            target_ep,
            settings,
            name=name,
            dry_run=dry_run,
            show_progress=show_progress,
        )
    finally:
        ledger.close()


def _run_rest(
    ledger: Ledger,
    source_ep: Endpoint,
    target_ep: Endpoint,
    settings: Settings,
    *,
    name: str,
    dry_run: bool = False,
    show_progress: bool = True,
    follow: float | None = None,
) -> JobReport:
    async def main() -> JobReport:
        source = RestSource(
            make_client(source_ep, "source", settings), settings.retry, settings.page_size
        )
        target = make_client(target_ep, "target", settings)
        try:
            return await run_job(
                ledger,
                source,
                target,
                settings,
                job_name=name,
                options={"concurrency": settings.concurrency},
                dry_run=dry_run,
                show_progress=show_progress,
                follow=follow,
            )
        finally:
            await source.aclose()
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
) -> JobReport:
    """Copy everything, then keep following the source's change log (`migrator mirror`).

    Runs until stopped (Ctrl-C, SIGTERM) or a fatal error; the change position lives in
    the ledger, so a restart continues where it stopped.
    """
    if poll <= 0:
        raise UsageError("--poll must be positive")
    source_ep, target_ep, name = _rest_ends(source_url, target_url, settings, job_name)
    ledger = Ledger.open(settings.ledger, create=True)
    try:
        return _run_rest(
            ledger,
            source_ep,
            target_ep,
            settings,
            name=name,
            show_progress=show_progress,
            follow=poll,
        )
    finally:
        ledger.close()


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
        target_ep = endpoint_from(job.target, "target", settings)
        if job.kind == "replicate":
            source_ep = endpoint_from(job.source, "source", settings)
            return _run_rest(
                ledger, source_ep, target_ep, settings, name=job.name, show_progress=show_progress
            )
        from migrator.folder_source import FolderSource

        return _run_folder(
            ledger,
            FolderSource(job.source, job.options.get("storage")),
            target_ep,
            settings,
            name=job.name,
            options=job.options,
            show_progress=show_progress,
        )
    finally:
        ledger.close()


def _run_folder(
    ledger: Ledger,
    source: Source,
    target_ep: Endpoint,
    settings: Settings,
    *,
    name: str,
    options: dict[str, Any],
    dry_run: bool = False,
    show_progress: bool = True,
) -> JobReport:
    async def main() -> JobReport:
        target = make_client(target_ep, "target", settings)
        try:
            return await run_job(
                ledger,
                source,
                target,
                settings,
                job_name=name,
                options=options,
                dry_run=dry_run,
                show_progress=show_progress,
            )
        finally:
            await target.aclose()

    return asyncio.run(main())


def import_path(
    path: str,
    target_url: str | None,
    settings: Settings,
    *,
    job_name: str | None = None,
    dry_run: bool = False,
    show_progress: bool = True,
    storage: str | None = None,
) -> JobReport:
    """Import an Orthanc storage folder or any folder of DICOM files (`migrator import`).

    ``storage`` is the folder holding the attachment files of an Orthanc index (``path``)
    when it is not the index's own folder.
    """
    from migrator.folder_source import FolderSource  # only imports read folders

    source = FolderSource(path, storage)
    target_ep = endpoint_from(target_url, "target", settings)
    name = job_name or default_job_name("import", source.display, target_ep)
    asyncio.run(source.preflight())
    check_endpoints(settings, target=target_ep)
    ledger = Ledger.open(settings.ledger, create=True)
    try:
        report = _run_folder(
            ledger,
            source,
            target_ep,
            settings,
            name=name,
            options={
                "concurrency": settings.concurrency,
                "folder_kind": source.info.kind,
                # A worker joining the job reads the files from the same place.
                **({"storage": source.info.storage} if storage else {}),
            },
            dry_run=dry_run,
            show_progress=show_progress,
        )
    finally:
        ledger.close()
    if report.job.listing_done or report.result.listed:
        wanted = sum(report.counts[k] for k in ("pending", "in_flight", "sent", "rejected"))
        if not wanted and not report.counts["failed"] and report.counts["skipped"]:
            raise UsageError(
                f"{path} holds no DICOM instance to send ({report.counts['skipped']} files "
                f"skipped: see `migrator status --job {name}`)"
            )
    return report


__all__ = ["FatalError", "JobReport", "import_path", "mirror", "replicate", "run_job", "work"]
