"""Listed rows into the ledger: the column values of a listed row, and the inserts.

A listing writes up to millions of rows, in transactions of a few thousand. On SQLite
they go in multi-row ``INSERT ... VALUES (...), (...)`` statements of up to
`ROWS_PER_INSERT` rows: each statement is one ``sqlite3_step``, run without the GIL.
``executemany`` takes the GIL back after every row; while the event loop of the same
process parses listing pages, each row then waits for it (measured: 100,000 rows in 2.2 s
alone, 19 s beside a thread parsing JSON; as multi-row statements, 3.8 s). PostgreSQL
keeps ``executemany`` (psycopg sends the rows without that cost).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain
from typing import Any

from migrator.selection import study_date_key

# The row columns a source gives, in the order of the insert's parameters.
LISTED_COLUMNS = (
    "source_key",
    "orthanc_id",
    "sop_uid",
    "study_uid",
    "series_uid",
    "path",
    "size",
    "md5",
    "has_pixels",
    "study_date",
)
# The columns of one inserted row: those, after the job, state and times.
INSERT_COLUMNS = ("job_id", "state", "last_error", "created_at", "updated_at", *LISTED_COLUMNS)
# At most this many rows per SQLite statement (fewer under an old SQLite's limit of 999
# parameters). Anonymous parameters: SQLite looks ``?NNN`` ones up one by one, and
# preparing a statement of 2,000 numbered rows takes 0.6 s (anonymous: 6 ms).
ROWS_PER_INSERT = 1000


def listed_values(row: dict[str, Any]) -> tuple[Any, ...]:
    """A listed row's `LISTED_COLUMNS`, its study date as the ledger keeps it."""
    get = row.get
    return (
        get("source_key"),
        get("orthanc_id"),
        get("sop_uid"),
        get("study_uid"),
        get("series_uid"),
        get("path"),
        get("size"),
        get("md5"),
        get("has_pixels"),
        study_date_key(get("study_date")),
    )


@lru_cache(maxsize=32)
def listing_sql(dialect: str, rows: int = 1) -> str:
    """The insert of `rows` listed rows (ignoring the ones the job holds); PostgreSQL's
    is run with ``executemany``, one row per parameter set."""
    mark = "%s" if dialect == "postgresql" else "?"
    one = f"({', '.join(mark for _ in INSERT_COLUMNS)}, 0, 0)"
    return (
        f"INSERT INTO instances ({', '.join(INSERT_COLUMNS)}, attempts, next_attempt_at) "
        f"VALUES {', '.join([one] * rows)} "
        "ON CONFLICT (job_id, source_key) DO NOTHING"
    )


def insert_listed(conn: Any, dialect: str, params: Sequence[tuple[Any, ...]]) -> int:
    """Insert rows (each the parameters of `INSERT_COLUMNS`) in the transaction of `conn`
    (a SQLAlchemy connection); how many were new."""
    if not params:
        return 0
    if dialect != "sqlite":
        return max(conn.exec_driver_sql(listing_sql(dialect), list(params)).rowcount, 0)
    per = _rows_per_insert(conn)
    added = 0
    for at in range(0, len(params), per):
        chunk = params[at : at + per]
        flat = tuple(chain.from_iterable(chunk))
        added += max(conn.exec_driver_sql(listing_sql(dialect, len(chunk)), flat).rowcount, 0)
    return added


def _rows_per_insert(conn: Any) -> int:
    """Rows per statement under this SQLite's limit on parameters."""
    try:
        limit = conn.connection.driver_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    except (AttributeError, sqlite3.Error):
        limit = 999  # the smallest default there was
    return max(1, min(ROWS_PER_INSERT, limit // len(INSERT_COLUMNS)))
