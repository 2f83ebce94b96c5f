"""`migrator report`: one line per instance, as CSV or JSON Lines, streamed from the ledger.

Rows are read in id order by keyset pagination (``WHERE id > :last ORDER BY id LIMIT n``,
`ledger.queries.report_page`), each page in its own short read transaction: memory stays
flat for ten million rows, and an SQLite reader never pins an old snapshot (which would
stop the WAL from being checkpointed while workers write). Times are ISO 8601 UTC. The
ledger never holds a password; text fields still pass through `redact`, since an error
message may quote a URL.
In CSV, a text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a
leading ``'`` (OWASP's advice against CSV injection): a spreadsheet would otherwise run it
as a formula. JSON Lines, read by programs, keeps every value as stored.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from migrator.endpoints import redact
from migrator.errors import UsageError
from migrator.ledger.queries import REPORT_COLUMNS, report_page
from migrator.ledger.store import Job, Ledger
from migrator.states import State, VerifyResult

PAGE = 5000
FORMATS = ("csv", "jsonl")

# The report's columns: the job's name, then the ledger's (`queries.REPORT_COLUMNS`).
COLUMNS = ("job", *REPORT_COLUMNS)
TIMES = frozenset({"created_at", "updated_at", "sent_at", "verified_at"})
TEXTS = frozenset({"source_key", "verify_detail", "last_error"})


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# First characters that make a spreadsheet read a cell as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV value that a spreadsheet shows as text, never runs as a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _clean(text: str | None) -> str | None:
    # A URL with credentials has '@' in it; most rows have none, so skip the regex.
    return redact(text) if text and "@" in text else text


def iter_rows(
    ledger: Ledger, job: Job, filters: Sequence[State | VerifyResult] = ()
) -> Iterator[dict[str, Any]]:
    """Every row of `job` (optionally only those in the given states / verify results),
    in id order, as report dicts."""
    last = 0
    while True:
        page = report_page(ledger, job.id, filters, last, PAGE)
        for row in page:
            item: dict[str, Any] = {"job": job.name}
            for name, value in zip(REPORT_COLUMNS, row[1:], strict=True):
                if name in TIMES:
                    value = _iso(value)
                elif name in TEXTS:
                    value = _clean(value)
                item[name] = value
            yield item
        if len(page) < PAGE:
            return
        last = page[-1][0]


def write_report(rows: Iterator[dict[str, Any]], fmt: str, out: IO[str]) -> int:
    """Write rows as CSV (with a header) or JSON Lines; returns how many were written."""
    n = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({name: _cell(value) for name, value in row.items()})
            n += 1
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            out.write("\n")
            n += 1
    else:
        raise UsageError(f"unknown report format {fmt!r} (one of: {', '.join(FORMATS)})")
    return n


def export(
    ledger: Ledger,
    jobs: Sequence[Job],
    fmt: str,
    output: Path | None,
    out: IO[str],
    filters: Sequence[State | VerifyResult] = (),
) -> int:
    """Write the report of `jobs` to `output` (atomically: a partial file never has the
    final name) or to `out`; returns the number of rows."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown report format {fmt!r} (one of: {', '.join(FORMATS)})")

    def rows() -> Iterator[dict[str, Any]]:
        for job in jobs:
            yield from iter_rows(ledger, job, filters)

    if output is None:
        return write_report(rows(), fmt, out)
    if output.is_dir():
        raise UsageError(f"report output {output} is a directory")
    if not output.parent.exists():
        raise UsageError(f"report folder {output.parent} does not exist")
    partial = output.with_name(output.name + ".part")
    try:
        with partial.open("w", encoding="utf-8", newline="") as handle:
            n = write_report(rows(), fmt, handle)
        os.replace(partial, output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return n
