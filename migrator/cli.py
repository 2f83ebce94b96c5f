"""The `migrator` command line: a thin typer layer over `migrator.app` and the ledger.

Exit codes: 0 every instance sent; 1 some instances rejected or failed; 2 usage or
configuration error; 3 fatal run error; 130 interrupted. Errors are one line, never a
traceback (``MIGRATOR_DEBUG=1`` shows it for bug reports).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from migrator import app as api
from migrator import db
from migrator.config import Settings, load_settings
from migrator.errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE, MigratorError, UsageError
from migrator.ledger import Job, Ledger
from migrator.reports import render_status, status_document
from migrator.states import RETRYABLE_BY_USER, State, parse_state

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
    typer.Option("--ledger", help="Ledger URL (default sqlite:///migrator.db, or the config)."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (see config.example.toml)."),
]
JobOpt = Annotated[str | None, typer.Option("--job", help="Job name.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log every retry.")]


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
    typer.echo(f"migrator: error: {message}", err=True)
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
        if os.environ.get("MIGRATOR_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (MIGRATOR_DEBUG=1 for details)", 3)
    raise AssertionError("unreachable")


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(config, **overrides)


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


@cli.command()
def replicate(
    source_url: Annotated[str | None, typer.Argument(help="Source Orthanc URL.")] = None,
    target_url: Annotated[str | None, typer.Argument(help="Target Orthanc URL.")] = None,
    job: JobOpt = None,
    ledger: LedgerOpt = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Concurrent transfers.")
    ] = None,
    config: ConfigOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Fill the ledger, send nothing.")
    ] = False,
    progress: Annotated[
        str | None, typer.Option("--progress", help="auto, bar, plain or none.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Replicate every instance of SOURCE_URL into TARGET_URL; rerun to resume.

    Example: migrator replicate http://orthanc:orthanc@old:8042/ http://new:8042/ -c 16
    """
    _setup_logging(verbose)

    def body() -> int:
        settings = _settings(config, ledger=ledger, concurrency=concurrency, progress=progress)
        report = api.replicate(source_url, target_url, settings, job_name=job, dry_run=dry_run)
        typer.echo(report.summary(), err=report.exit_code != 0)
        return report.exit_code

    raise typer.Exit(_guard(body))


@cli.command("import")
def import_(
    path: Annotated[str, typer.Argument(help="Orthanc storage folder, or any DICOM folder.")],
    target_url: Annotated[str | None, typer.Argument(help="Target Orthanc URL.")] = None,
    job: JobOpt = None,
    ledger: LedgerOpt = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Concurrent transfers.")
    ] = None,
    config: ConfigOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Fill the ledger, send nothing.")
    ] = False,
    progress: Annotated[
        str | None, typer.Option("--progress", help="auto, bar, plain or none.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Send the DICOM instances of a folder (an old Orthanc storage area, with or without
    its index, or any tree of files) to TARGET_URL; rerun to resume.

    Example: migrator import /var/lib/orthanc/db-v5 http://orthanc:orthanc@localhost:8042/
    """
    _setup_logging(verbose)

    def body() -> int:
        settings = _settings(config, ledger=ledger, concurrency=concurrency, progress=progress)
        report = api.import_path(path, target_url, settings, job_name=job, dry_run=dry_run)
        typer.echo(report.summary(), err=report.exit_code != 0)
        return report.exit_code

    raise typer.Exit(_guard(body))


@cli.command()
def inspect(
    path: Annotated[str, typer.Argument(help="Folder to assess.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Assess a folder before an import, sending nothing: kind, counts, missing and orphan
    files, and the command to run.

    Example: migrator inspect /var/lib/orthanc/db-v5
    """
    from migrator.inspect import inspect_path, render_text

    def body() -> None:
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
) -> None:
    """Counts by state, bytes, rate, ETA and the most common errors of each job.

    Example: migrator status --json
    """

    def body() -> None:
        settings = _settings(config, ledger=ledger)
        led = _open(settings)
        try:
            if job is not None:
                _pick_job(led, job)
            doc = status_document(led, job)
        finally:
            led.close()
        typer.echo(json.dumps(doc, indent=2) if as_json else render_status(doc))

    _guard(body)


@cli.command()
def jobs(ledger: LedgerOpt = None, config: ConfigOpt = None) -> None:
    """List the jobs in the ledger.

    Example: migrator jobs --ledger sqlite:///migrator.db
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
        typer.Option("--state", help="State(s) to retry: failed (default), rejected, ..."),
    ] = None,
    error: Annotated[
        str | None, typer.Option("--error", help="Only rows whose last error contains this.")
    ] = None,
    ledger: LedgerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Put failed (or other) rows back to pending; the next run sends them.

    Example: migrator retry --state rejected --error FilteredOut
    """

    def body() -> None:
        try:
            states = [parse_state(s) for s in (state or ["failed"])]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        for s in states:
            if s not in RETRYABLE_BY_USER:
                raise UsageError(f"rows in state {s.value} cannot be retried")
        led = _open(_settings(config, ledger=ledger))
        try:
            target = _pick_job(led, job)
            moved = led.retry(target.id, states, error)
        finally:
            led.close()
        names = ", ".join(s.value for s in states)
        typer.echo(f"{moved} rows ({names}) of job {target.name} are pending again")

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


@db_cli.command("upgrade")
def db_upgrade(ledger: LedgerOpt = None, config: ConfigOpt = None) -> None:
    """Upgrade the ledger's schema to this version of migrator (back it up first).

    Example: migrator db upgrade --ledger sqlite:///migrator.db
    """

    def body() -> None:
        settings = _settings(config, ledger=ledger)
        engine = db.make_engine(settings.ledger, must_exist=True)
        try:
            before = db.current_revision(engine)
            db.upgrade(engine)
            after = db.current_revision(engine)
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
    try:
        cli()
    except typer.Abort:
        typer.echo("migrator: error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


__all__ = ["EXIT_FATAL", "EXIT_USAGE", "State", "cli", "main"]
