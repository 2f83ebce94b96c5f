"""The commands that read or adjust a job: inspect, status, prioritize, jobs, retry."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from migrator import app as api
from migrator.cli.common import (
    ConfigOpt,
    JobOpt,
    LedgerOpt,
    _guard,
    _open,
    _pick_job,
    _settings,
    cli,
)
from migrator.errors import UsageError
from migrator.states import (
    RETRYABLE_BY_USER,
    State,
    VerifyResult,
    parse_state_or_result,
)
from migrator.views.reports import render_status, status_document


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
