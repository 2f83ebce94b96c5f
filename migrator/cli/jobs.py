"""The commands that run a job: replicate, worker, mirror, diff, import."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from migrator import app as api
from migrator.cli.common import (
    AetOpt,
    BatchOpt,
    ConcurrencyOpt,
    ConfigOpt,
    DryRunOpt,
    ExcludePatientOpt,
    FixedOpt,
    IncludeUndatedOpt,
    JobOpt,
    LedgerOpt,
    MaxBandwidthOpt,
    MaxRateOpt,
    ModalityOpt,
    OrderOpt,
    ProgressOpt,
    SinceOpt,
    StudiesOpt,
    UntilOpt,
    VerboseOpt,
    WindowOpt,
    _guard,
    _selection,
    _settings,
    _setup_logging,
    _throttle,
    cli,
)
from migrator.config import Settings


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

    _setup_logging(verbose)
    flags = _selection(since, until, modality, studies, exclude_patient, include_undated, None)

    def body() -> int:
        selection = flags["selection"].resolve(date.today())
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
    """Import a folder or a stopped Orthanc's index database into TARGET_URL; rerun to resume.

    A folder: an old Orthanc storage area (with or without its index), or any tree of files.

    A postgresql:// or mysql:// URL: the index of an Orthanc that used those plugins.

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
