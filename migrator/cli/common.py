"""What every command shares: the typer apps, the options, one-line errors and exit
codes, settings and the ledger."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from migrator.config import Settings, load_settings
from migrator.errors import EXIT_INTERRUPTED, MigratorError, UsageError
from migrator.ledger.store import Job, Ledger

cli = typer.Typer(
    name="migrator",
    help="Move DICOM data between archives through a resumable per-instance ledger.",
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
