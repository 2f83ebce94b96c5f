"""The commands that prove and show: demo, verify, report, serve, db."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from migrator.cli.common import (
    AetOpt,
    ConfigOpt,
    JobOpt,
    LedgerOpt,
    VerboseOpt,
    _guard,
    _open,
    _pick_job,
    _settings,
    _setup_logging,
    cli,
    db_cli,
)
from migrator.errors import UsageError
from migrator.ledger import db
from migrator.states import (
    parse_state_or_result,
)


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
