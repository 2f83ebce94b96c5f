"""The `migrator` command line: a thin typer layer over `migrator.app` and the ledger.

Exit codes: 0 every instance sent; 1 some instances rejected or failed; 2 usage or
configuration error; 3 fatal run error; 130 interrupted; 141 (128 + SIGPIPE, as for any
filter) the reader of the output went away, e.g. ``migrator report | head``: no message.
Errors are one line, never a traceback (``MIGRATOR_DEBUG=1`` shows it for bug reports)."""

from __future__ import annotations

import gc
import sys

import typer

from migrator.cli.common import EXIT_PIPE, cli
from migrator.errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE
from migrator.states import State

# The commands register themselves on `cli`, in the order --help lists them.
# isort: off
from migrator.cli import jobs  # noqa: F401
from migrator.cli import status  # noqa: F401
from migrator.cli import proof  # noqa: F401
# isort: on


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


__all__ = ["EXIT_FATAL", "EXIT_PIPE", "EXIT_USAGE", "State", "cli", "main"]
