"""The `migrator` command line: a thin typer layer over `migrator.app` and the ledger.

Exit codes: 0 every instance sent; 1 some instances rejected or failed; 2 usage or
configuration error; 3 fatal run error; 130 interrupted; 141 (128 + SIGPIPE, as for any
filter) the reader of the output went away, e.g. ``migrator report | head``: no message.
Errors are one line, never a traceback (``MIGRATOR_DEBUG=1`` shows it for bug reports).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from migrator import app as api
from migrator.config import Settings, load_settings
from migrator.errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE, MigratorError, UsageError
from migrator.ledger import db
from migrator.ledger.store import Job, Ledger
from migrator.states import (
    RETRYABLE_BY_USER,
    State,
    VerifyResult,
    parse_state_or_result,
)
from migrator.views.reports import render_status, status_document

cli = typer.Typer(
    name="migrator",
    help="Move DICOM data into Orthanc through a resumable per-instance ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_cli = typer.Typer(help="Manage the ledger's schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")

T = TypeVar("T")

LedgerOpt = Annotated[
    str | None,
    typer.Option(
        "--ledger", help="Ledger URL (default sqlite:///migrator.ledger.db, or the config)."
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (see config.example.toml)."),
]
JobOpt = Annotated[str | None, typer.Option("--job", help="Job name.")]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--concurrency",
        "-c",
        help="Most transfers at once: the concurrency tunes itself up to this (default 64).",
    ),
]
FixedOpt = Annotated[
    bool,
    typer.Option("--fixed", help="Exactly -c transfers at once (default 8), no self-tuning."),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch",
        help="Instances per request each way, as ZIP archives (to a DICOMweb target: "
        "multi-instance STOW-RS; 1: one at a time; default: decided from the measured "
        "round trips).",
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Fill the ledger, send nothing.")]
ProgressOpt = Annotated[str | None, typer.Option("--progress", help="auto, bar, plain or none.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log every retry.")]
MaxRateOpt = Annotated[
    str | None,
    typer.Option("--max-rate", help="At most this many instances: 50 (per second), 3000/min."),
]
MaxBandwidthOpt = Annotated[
    str | None,
    typer.Option("--max-bandwidth", help="At most this many bytes per second: 10M, 500K, 1Gi."),
]
WindowOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--window",
        help='Run only then, e.g. "Mon-Fri 19:00-07:00" or "Sat-Sun 00:00-24:00=unlimited" '
        "(repeatable; =LIMIT sets the pace inside; paused outside every window).",
    ),
]


AetOpt = Annotated[
    str | None,
    typer.Option("--aet", help="Our AE title towards dicom:// peers (default MIGRATOR)."),
]


# What a job moves and in which order (`migrator.selection`, `migrator.ledger.order`).
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Only studies of this StudyDate or later: 20240101, 2024-01-01, or an age "
        "(30d, 6m, 2y) counted from the day the job was created.",
    ),
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", help="Only studies of this StudyDate or earlier (as --since)."),
]
ModalityOpt = Annotated[
    list[str] | None,
    typer.Option("--modality", help="Only studies with this modality (repeatable: CT, MR...)."),
]
StudiesOpt = Annotated[
    str | None,
    typer.Option(
        "--studies",
        help="Only the studies a file lists: a CSV whose header names a StudyInstanceUID, "
        "AccessionNumber or PatientID column, or one StudyInstanceUID per line.",
    ),
]
ExcludePatientOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude-patient", help="Leave this PatientID out (repeatable)."),
]
IncludeUndatedOpt = Annotated[
    bool,
    typer.Option("--include-undated", help="With --since/--until: studies without StudyDate too."),
]
OrderOpt = Annotated[
    str | None,
    typer.Option(
        "--order",
        help="Whole studies, newest StudyDate first (newest, the default for a new job), "
        "oldest first, or as listed (listing).",
    ),
]


def _selection(
    since: str | None,
    until: str | None,
    modality: list[str] | None,
    studies: str | None,
    exclude_patient: list[str] | None,
    include_undated: bool,
    order: str | None,
) -> dict[str, Any]:
    """The selection and order options of a job command, as `migrator.app` takes them
    (and checks them)."""
    from migrator.selection import SelectionFlags

    flags = SelectionFlags(
        since=since,
        until=until,
        modalities=tuple(modality or ()),
        studies_file=studies,
        exclude_patients=tuple(exclude_patient or ()),
        include_undated=include_undated,
    )
    return {"selection": flags, "order": order}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the current sys.stderr, which rich swaps while a progress bar is live."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("migrator")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    # httpx logs every request at INFO; keep that out of the way.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _fail(message: str, code: int) -> None:
    # Hostile input echoed in a message (a path or URL with a newline or a terminal escape)
    # must neither break the one-line promise nor drive the terminal: escape it.
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)
    typer.echo(f"migrator: error: {text}", err=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body, turning every error into one line and an exit code."""
    try:
        return fn()
    except MigratorError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            _quiet_pipe_exit()
        if os.environ.get("MIGRATOR_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (MIGRATOR_DEBUG=1 for details)", 3)
    raise AssertionError("unreachable")


# The exit status a shell reports for a filter killed by SIGPIPE (128 + 13).
EXIT_PIPE = 141


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has closed it.

    A BrokenPipeError may also come from a connection to a server; only a closed stdout
    ends the command quietly."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_pipe_exit() -> None:
    """End like a Unix filter whose reader went away (`report | head`): no message."""
    # Python flushes stdout once more at exit; with /dev/null behind it that flush cannot
    # fail and print "Exception ignored ... BrokenPipeError".
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    raise typer.Exit(EXIT_PIPE)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(config, **overrides)


def _throttle(rate: str | None, bandwidth: str | None, windows: list[str] | None) -> Any:
    """Throttle settings from the command line (None: not given, the config decides)."""
    return {
        "max_rate": rate,
        "max_bandwidth": bandwidth,
        "windows": tuple(windows) if windows else None,
    }


def _open(settings: Settings) -> Ledger:
    return Ledger.open(settings.ledger, create=False)


def _pick_job(ledger: Ledger, name: str | None) -> Job:
    if name is not None:
        job = ledger.get_job(name)
        if job is None:
            known = ", ".join(j.name for j in ledger.list_jobs()) or "none"
            raise UsageError(f"no job named {name!r} in the ledger (jobs: {known})")
        return job
    jobs = ledger.list_jobs()
    if len(jobs) == 1:
        return jobs[0]
    if not jobs:
        raise UsageError("the ledger has no jobs yet")
    raise UsageError("the ledger has several jobs: name one with --job (see `migrator jobs`)")


def _job_command(
    start: Callable[[Settings], api.JobReport],
    *,
    verbose: bool,
    config: Path | None,
    throttle: tuple[str | None, str | None, list[str] | None],
    **overrides: Any,
) -> None:
    """The body shared by the commands that run a job: settings, run, summary, exit code."""
    _setup_logging(verbose)

    def body() -> int:
        settings = _settings(config, **overrides, **_throttle(*throttle))
        report = start(settings)
        typer.echo(report.summary(), err=report.exit_code != 0)
        return report.exit_code

    raise typer.Exit(_guard(body))


@cli.command()
def replicate(
    source_url: Annotated[str | None, typer.Argument(help="Source Orthanc URL.")] = None,
    target_url: Annotated[str | None, typer.Argument(help="Target Orthanc URL.")] = None,
    job: JobOpt = None,
    ledger: LedgerOpt = None,
    concurrency: ConcurrencyOpt = None,
    fixed: FixedOpt = False,
    batch: BatchOpt = None,
    config: ConfigOpt = None,
    max_rate: MaxRateOpt = None,
    max_bandwidth: MaxBandwidthOpt = None,
    window: WindowOpt = None,
    dry_run: DryRunOpt = False,
    progress: ProgressOpt = None,
    verbose: VerboseOpt = False,
    aet: AetOpt = None,
    only_missing: Annotated[
        bool,
        typer.Option(
            "--only-missing",
            help="Send only the instances the target lacks (the two Orthancs' inventories "
            "compared, as `migrator diff` does); a job of its own.",
        ),
    ] = False,
    since: SinceOpt = None,
    until: UntilOpt = None,
    modality: ModalityOpt = None,
    studies: StudiesOpt = None,
    exclude_patient: ExcludePatientOpt = None,
    include_undated: IncludeUndatedOpt = False,
    order: OrderOpt = None,
) -> None:
    """Replicate every instance of SOURCE_URL into TARGET_URL; rerun to resume.

    Example: migrator replicate http://orthanc:orthanc@old:8042/ http://new:8042/ -c 16
    """
    chosen = _selection(since, until, modality, studies, exclude_patient, include_undated, order)
    _job_command(
        lambda s: api.replicate(
            source_url,
            target_url,
            s,
            job_name=job,
            dry_run=dry_run,
            only_missing=only_missing,
            **chosen,
        ),
        verbose=verbose,
        config=config,
        throttle=(max_rate, max_bandwidth, window),
        ledger=ledger,
        concurrency=concurrency,
        adaptive=False if fixed else None,
        batch=batch,
        progress=progress,
        dimse_aet=aet,
    )


@cli.command()
def worker(
    job: Annotated[str, typer.Option("--job", help="Name of the job to join (see `jobs`).")],
    ledger: LedgerOpt = None,
    concurrency: ConcurrencyOpt = None,
    fixed: FixedOpt = False,
    batch: BatchOpt = None,
    config: ConfigOpt = None,
    max_rate: MaxRateOpt = None,
    max_bandwidth: MaxBandwidthOpt = None,
    window: WindowOpt = None,
    progress: ProgressOpt = None,
    verbose: VerboseOpt = False,
    aet: AetOpt = None,
) -> None:
    """Join an existing job and drain it, beside any number of other workers.

    Workers may run on any hosts that share one PostgreSQL ledger.
    Passwords come from the config file or the environment.

    Example: migrator worker --job 'replicate:old:8042->new:8042' --ledger postgresql://db/mig
    """
    _job_command(
        lambda s: api.work(job, s),
        verbose=verbose,
        config=config,
        throttle=(max_rate, max_bandwidth, window),
        ledger=ledger,
        concurrency=concurrency,
        adaptive=False if fixed else None,
        batch=batch,
        progress=progress,
        dimse_aet=aet,
    )


@cli.command()
def mirror(
    source_url: Annotated[str | None, typer.Argument(help="Source Orthanc URL.")] = None,
    target_url: Annotated[str | None, typer.Argument(help="Target Orthanc URL.")] = None,
    job: JobOpt = None,
    poll: Annotated[
        float, typer.Option("--poll", help="Seconds between looks at the source's changes.")
    ] = 2.0,
    ledger: LedgerOpt = None,
    concurrency: ConcurrencyOpt = None,
    fixed: FixedOpt = False,
    batch: BatchOpt = None,
    config: ConfigOpt = None,
    max_rate: MaxRateOpt = None,
    max_bandwidth: MaxBandwidthOpt = None,
    window: WindowOpt = None,
    verbose: VerboseOpt = False,
    reconcile_every: Annotated[
        str,
        typer.Option(
            "--reconcile-every",
            help="How often to compare the source's inventory with what was sent, to find "
            "instances deleted on the source (90s, 30m, 1h).",
        ),
    ] = "1h",
    propagate_deletes: Annotated[
        bool,
        typer.Option(
            "--propagate-deletes",
            help="Delete on the target the instances deleted on the source (default: "
            "only record and report them).",
        ),
    ] = False,
    max_deletes: Annotated[
        int,
        typer.Option(
            "--max-deletes",
            help="Most deletions on the target per comparison: with more waiting, none is "
            "made and the mirror stops (exit 3).",
        ),
    ] = 100,
    since: SinceOpt = None,
    until: UntilOpt = None,
    modality: ModalityOpt = None,
    studies: StudiesOpt = None,
    exclude_patient: ExcludePatientOpt = None,
    include_undated: IncludeUndatedOpt = False,
    order: OrderOpt = None,
) -> None:
    """Copy everything, then keep the target in step with the source's change log.

    New studies the source receives are copied as they arrive.
    Instances deleted on the source are found every --reconcile-every and reported.
    With --propagate-deletes they are deleted on the target too, at most --max-deletes at a time.
    The command runs until stopped (SIGTERM or Ctrl-C).

    Example: migrator mirror http://main:8042/ http://mirror:8042/ --poll 1
    """
    from migrator.engine.deletions import DeletionPolicy
    from migrator.views.verify_report import parse_age

    chosen = _selection(since, until, modality, studies, exclude_patient, include_undated, order)
    _job_command(
        lambda s: api.mirror(
            source_url,
            target_url,
            s,
            job_name=job,
            poll=poll,
            **chosen,
            deletions=DeletionPolicy(
                every=parse_age(reconcile_every, "--reconcile-every"),
                propagate=propagate_deletes,
                max_deletes=max_deletes,
            ),
        ),
        verbose=verbose,
        config=config,
        throttle=(max_rate, max_bandwidth, window),
        ledger=ledger,
        concurrency=concurrency,
        adaptive=False if fixed else None,
        batch=batch,
        progress="plain",
    )


@cli.command()
def diff(
    source_url: Annotated[str | None, typer.Argument(help="Source Orthanc URL.")] = None,
    target_url: Annotated[str | None, typer.Argument(help="Target Orthanc URL.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only studies of this StudyDate or later: 20240101, 2024-01-01, or an age "
            "(30d, 6m, 2y) counted from today.",
        ),
    ] = None,
    until: UntilOpt = None,
    modality: ModalityOpt = None,
    studies: StudiesOpt = None,
    exclude_patient: ExcludePatientOpt = None,
    include_undated: IncludeUndatedOpt = False,
    max_list: Annotated[
        int, typer.Option("--max-list", help="List at most this many studies and instances.")
    ] = 1000,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Compare two Orthancs: what the target lacks (missing), holds alone (extra), per study.

    No file is read: both inventories are read at once, two requests per server.
    Exit 0 when the target holds every instance of the source, 1 otherwise.

    Example: migrator diff http://old:8042/ http://new:8042/ --since 2y --json
    """
    from datetime import date

    from migrator.selection import SelectionFlags

    _setup_logging(verbose)

    def body() -> int:
        selection = SelectionFlags(
            since=since,
            until=until,
            modalities=tuple(modality or ()),
            studies_file=studies,
            exclude_patients=tuple(exclude_patient or ()),
            include_undated=include_undated,
        ).resolve(date.today())
        result = api.diff(
            source_url, target_url, _settings(config), selection=selection, max_list=max_list
        )
        limit = max(max_list, 0)
        typer.echo(
            json.dumps(result.as_json(limit), indent=2) if as_json else result.render_text(limit)
        )
        return result.exit_code

    raise typer.Exit(_guard(body))


@cli.command("import")
def import_(
    path: Annotated[str, typer.Argument(help="Orthanc storage folder, or any DICOM folder.")],
    target_url: Annotated[str | None, typer.Argument(help="Target Orthanc URL.")] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Folder holding the xx/yy/<uuid> files of an Orthanc index that lives "
            "elsewhere (Orthanc's StorageDirectory apart from its IndexDirectory).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Read an Orthanc index database although an Orthanc still holds its lock.",
        ),
    ] = False,
    job: JobOpt = None,
    ledger: LedgerOpt = None,
    concurrency: ConcurrencyOpt = None,
    fixed: FixedOpt = False,
    batch: BatchOpt = None,
    config: ConfigOpt = None,
    max_rate: MaxRateOpt = None,
    max_bandwidth: MaxBandwidthOpt = None,
    window: WindowOpt = None,
    dry_run: DryRunOpt = False,
    progress: ProgressOpt = None,
    verbose: VerboseOpt = False,
    aet: AetOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    modality: ModalityOpt = None,
    studies: StudiesOpt = None,
    exclude_patient: ExcludePatientOpt = None,
    include_undated: IncludeUndatedOpt = False,
    order: OrderOpt = None,
) -> None:
    """Send the DICOM instances of a folder to TARGET_URL; rerun to resume.

    The folder is an old Orthanc storage area (with or without its index) or any tree of files.

    Example: migrator import /var/lib/orthanc/db-v5 http://orthanc:orthanc@localhost:8042/
    """
    chosen = _selection(since, until, modality, studies, exclude_patient, include_undated, order)
    _job_command(
        lambda s: api.import_path(
            path,
            target_url,
            s,
            job_name=job,
            dry_run=dry_run,
            storage=storage,
            force=force,
            **chosen,
        ),
        verbose=verbose,
        config=config,
        throttle=(max_rate, max_bandwidth, window),
        ledger=ledger,
        concurrency=concurrency,
        adaptive=False if fixed else None,
        batch=batch,
        progress=progress,
        dimse_aet=aet,
    )


@cli.command()
def inspect(
    path: Annotated[str, typer.Argument(help="Folder to assess.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    storage: Annotated[
        str | None,
        typer.Option("--storage", help="Folder of an index database's files (xx/yy/<uuid>)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Assess a folder, or a stopped Orthanc's index database, before an import, sending nothing.

    It tells the kind of folder, its counts, missing and orphan files, and the command to run.

    Example: migrator inspect /var/lib/orthanc/db-v5
    """
    from migrator.ends.factory import end_kind
    from migrator.ends.folder.inspect import inspect_path, render_text

    def body() -> None:
        if end_kind(path) == "database":
            from migrator.ends.database import inspect as database

            found = database.inspect_database(path, _settings(config), storage)
            typer.echo(json.dumps(found, indent=2) if as_json else database.render_text(found))
            return
        try:
            report = inspect_path(path)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise UsageError(exc.strerror or str(exc)) from None
        typer.echo(json.dumps(report, indent=2) if as_json else render_text(report))

    _guard(body)


@cli.command()
def status(
    job: JobOpt = None,
    ledger: LedgerOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    studies: Annotated[
        bool,
        typer.Option(
            "--studies",
            help="Count studies too: complete, partial, pending, failed (with --json: under "
            "'studies'); reads every row.",
        ),
    ] = False,
) -> None:
    """Show each job's counts by state, bytes, rate, ETA and most common errors.

    Rows in flight are told apart: transferring now, or queued in a worker.
    With --studies, how many studies are complete and since when everything is sent.

    Example: migrator status --json
    """

    def body() -> None:
        settings = _settings(config, ledger=ledger)
        led = _open(settings)
        try:
            if job is not None:
                _pick_job(led, job)
            doc = status_document(led, job, studies=0.0 if studies else None)
        finally:
            led.close()
        typer.echo(json.dumps(doc, indent=2) if as_json else render_status(doc))

    _guard(body)


@cli.command()
def prioritize(
    job: JobOpt = None,
    study: Annotated[
        str | None, typer.Option("--study", help="This StudyInstanceUID first.")
    ] = None,
    patient: Annotated[
        str | None,
        typer.Option("--patient", help="This PatientID's studies first (an Orthanc source)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Studies of this StudyDate or later first (20250301, 30d)."),
    ] = None,
    ledger: LedgerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Move a study, a patient or recent studies ahead of the rest of a job's pending rows.

    Running workers take them at their next lease; nothing else changes.

    Example: migrator prioritize --study 1.2.840.113619.2.55.3.604688
    """

    def body() -> None:
        settings = _settings(config, ledger=ledger)
        led = _open(settings)
        try:
            picked = _pick_job(led, job)
            moved = api.prioritize(led, picked, settings, study=study, patient=patient, since=since)
        finally:
            led.close()
        typer.echo(f"job {picked.name}: {moved} pending instances moved to the front")

    _guard(body)


@cli.command()
def jobs(ledger: LedgerOpt = None, config: ConfigOpt = None) -> None:
    """List the jobs in the ledger.

    Example: migrator jobs --ledger sqlite:///migrator.ledger.db
    """

    def body() -> None:
        led = _open(_settings(config, ledger=ledger))
        try:
            for doc in status_document(led)["jobs"]:
                c = doc["counts"]
                typer.echo(
                    f"{doc['name']}\t{doc['kind']}\t{doc['source']} -> {doc['target']}\t"
                    f"{c['sent']}/{doc['total']} sent"
                )
        finally:
            led.close()

    _guard(body)


@cli.command()
def retry(
    job: JobOpt = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="State(s) to retry: failed (default), rejected, ...; or the verify results "
            "missing / differ (sent rows that `migrator verify` found missing or different).",
        ),
    ] = None,
    error: Annotated[
        str | None,
        typer.Option(
            "--error",
            help="Only rows whose last error (verify detail, for missing/differ) contains this.",
        ),
    ] = None,
    ledger: LedgerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Put failed (or other) rows back to pending; the next run sends them.

    Example: migrator retry --state rejected --error FilteredOut
    """

    def body() -> None:
        try:
            picked = [parse_state_or_result(s) for s in (state or ["failed"])]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        states = [s for s in picked if isinstance(s, State)]
        results = [r for r in picked if isinstance(r, VerifyResult)]
        for s in states:
            if s not in RETRYABLE_BY_USER:
                raise UsageError(f"rows in state {s.value} cannot be retried")
        for r in results:
            if r not in (VerifyResult.MISSING, VerifyResult.DIFFER):
                raise UsageError(f"only missing and differ rows can be retried, not {r.value}")
        led = _open(_settings(config, ledger=ledger))
        try:
            target = _pick_job(led, job)
            requeued = led.retry(target.id, states, error) if states else None
            kept = requeued.kept if requeued is not None else {}
            moved = int(requeued or 0)
            if results:
                moved += led.retry_verification(target.id, results, error)
        finally:
            led.close()
        names = ", ".join(s.value for s in picked)
        typer.echo(f"{moved} rows ({names}) of job {target.name} are pending again")
        for reason, count in kept.items():
            typer.echo(f"{count} skipped rows ({reason}) left skipped: such files are never sent")

    _guard(body)


@cli.command()
def demo(
    instances: Annotated[int, typer.Option("--instances", "-n", help="Synthetic instances.")] = 500,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c")] = 8,
    keep: Annotated[
        Path | None, typer.Option("--keep", help="Keep the Orthancs' folders and ledger here.")
    ] = None,
) -> None:
    """Replicate synthetic studies between two throwaway local Orthancs, end to end.

    Example: migrator demo --instances 1000
    """
    _setup_logging(False)
    from migrator.demo import run_demo

    raise typer.Exit(_guard(lambda: run_demo(instances, concurrency, keep)))


@cli.command()
def verify(
    job: JobOpt = None,
    target_url: Annotated[
        str | None,
        typer.Option(
            "--target-url",
            help="Target URL, with credentials if needed (default: the job's target, with "
            "the password from the config or MIGRATOR_TARGET_PASSWORD).",
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Concurrent checks (default 16).")
    ] = None,
    all_rows: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Begin a new pass that asks about every sent row, even when an "
            "interrupted pass could be carried on.",
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Begin a new pass that trusts matches found after this time (ISO 8601 or "
            "epoch seconds) and asks about the rest.",
        ),
    ] = None,
    max_age: Annotated[
        str | None,
        typer.Option(
            "--max-age",
            help="Begin a new pass that trusts matches younger than this (30m, 12h, 7d) "
            "and asks about the rest (default: ask about every sent row).",
        ),
    ] = None,
    accept_vanished: Annotated[
        bool,
        typer.Option(
            "--accept-vanished",
            help="Rows the source no longer has (vanished) were deleted there on purpose: "
            "they do not keep the job from being complete.",
        ),
    ] = False,
    no_studies: Annotated[
        bool, typer.Option("--no-studies", help="Skip the per-study instance counts.")
    ] = False,
    max_list: Annotated[
        int, typer.Option("--max-list", help="List at most this many rows per problem.")
    ] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    ledger: LedgerOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    aet: AetOpt = None,
) -> None:
    """Check that the target holds every instance of the job with the same bytes (MD5).

    Exit 0 only when every row is sent and matches, or was skipped on purpose.

    Example: migrator verify --job nightly --json
    """
    from migrator.views import verify_report

    _setup_logging(verbose)

    def body() -> int:
        if concurrency is not None and not 1 <= concurrency <= 512:
            raise UsageError("concurrency must be between 1 and 512")
        if sum((all_rows, since is not None, max_age is not None)) > 1:
            raise UsageError("give one of --all, --since and --max-age")
        start = verify_report.parse_since(since) if since is not None else None
        age = verify_report.parse_age(max_age) if max_age is not None else None
        settings = _settings(config, ledger=ledger, dimse_aet=aet)
        reports = verify_report.verify_jobs(
            settings,
            job_name=job,
            target_url=target_url,
            concurrency=concurrency,
            since=start,
            max_age=age,
            fresh=all_rows,
            accept_vanished=accept_vanished,
            studies=not no_studies,
            max_list=max(max_list, 0),
            progress=not as_json or verbose,
        )
        if as_json:
            typer.echo(json.dumps({"jobs": [r.as_json() for r in reports]}, indent=2))
        else:
            from migrator.views.verify_text import render_text

            typer.echo(render_text(reports))
        return verify_report.exit_code(reports)

    raise typer.Exit(_guard(body))


@cli.command()
def report(
    job: JobOpt = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state", help="Only rows in this state, or with this verify result (repeatable)."
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv or jsonl.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")
    ] = None,
    ledger: LedgerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write one line per instance of the ledger (CSV or JSON lines), in id order.

    Each line holds the source key, Orthanc ID, UIDs, state and target answer.
    It also holds the verification, attempts, last error and times (ISO 8601 UTC).

    Example: migrator report --state failed --format csv -o failed.csv
    """
    from migrator.views.export import export

    def body() -> None:
        try:
            filters = [parse_state_or_result(s) for s in (state or [])]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        led = _open(_settings(config, ledger=ledger))
        try:
            selected = [_pick_job(led, job)] if job is not None else led.list_jobs()
            n = export(led, selected, fmt.lower(), output, sys.stdout, filters)
        finally:
            led.close()
        if output is not None:
            typer.echo(f"{n} rows written to {output}", err=True)

    _guard(body)


@cli.command()
def serve(
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8080,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Also answer requests for this host name, e.g. a reverse proxy's (repeatable; "
            "* for any). Always answered: IP addresses, localhost and this machine's names.",
        ),
    ] = None,
    ledger: LedgerOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a read-only web page of the ledger's jobs: progress, rate, ETA and errors.

    It also answers /api/status (as `status --json`), /api/history and Prometheus /metrics.
    Started before the first job, the page says so and fills in as jobs appear.
    Requests for a host name it does not know get 421; --allow-host adds names.

    Example: migrator serve --port 8080 --ledger postgresql://migrator@db/migrator
    """
    from migrator.views.web import serve as run_server

    _setup_logging(verbose)

    def body() -> None:
        if not 0 <= port <= 65535:
            raise UsageError("port must be between 0 and 65535")
        run_server(_settings(config, ledger=ledger).ledger, host, port, allow_host or ())

    _guard(body)


@db_cli.command("upgrade")
def db_upgrade(ledger: LedgerOpt = None, config: ConfigOpt = None) -> None:
    """Upgrade the ledger's schema to this version of migrator (back it up first).

    Example: migrator db upgrade --ledger sqlite:///migrator.ledger.db
    """

    def body() -> None:
        settings = _settings(config, ledger=ledger)
        engine = db.make_engine(settings.ledger, must_exist=True)
        try:
            before, after = db.upgrade_ledger(engine)
        finally:
            engine.dispose()
        typer.echo(f"ledger schema: {before or 'empty'} -> {after}")

    _guard(body)


@db_cli.command("current")
def db_current(ledger: LedgerOpt = None, config: ConfigOpt = None) -> None:
    """Show the ledger's schema revision and the one this migrator needs."""

    def body() -> None:
        settings = _settings(config, ledger=ledger)
        engine = db.make_engine(settings.ledger, must_exist=True)
        try:
            current = db.current_revision(engine)
        finally:
            engine.dispose()
        typer.echo(f"ledger revision {current or 'none'}; this migrator needs {db.head_revision()}")

    _guard(body)


def main() -> None:
    """Console-script entry point."""
    # The modules imported so far live until exit: keep the cyclic collector from
    # scanning their objects again at every full collection of a long run.
    gc.freeze()
    try:
        cli()
    except typer.Abort:
        typer.echo("migrator: error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


__all__ = ["EXIT_FATAL", "EXIT_USAGE", "State", "cli", "main"]
