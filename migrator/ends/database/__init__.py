"""A stopped Orthanc's index database (PostgreSQL or MySQL plugins) as a source.

`index` reads the plugins' tables (read-only), `source` is the `DatabaseSource` an import
runs, `inspect` the assessment before it.
"""

from __future__ import annotations

from typing import Any

from migrator.config import Settings
from migrator.ends.base import Source


def open_database_source(url: str, settings: Settings, options: dict[str, Any]) -> Source:
    """The instances of an Orthanc whose index lives in the database at `url`.

    The password comes from the URL, else ``[source] password`` or
    ``MIGRATOR_SOURCE_PASSWORD``; ``options["storage"]`` is the old ``StorageDirectory``
    when the attachments are on disk; ``options["force"]`` reads a database that an
    Orthanc still holds; ``options["selection"]`` the studies to list
    (`migrator.selection`).
    """
    from migrator.ends.database.index import parse_db_url
    from migrator.ends.database.source import DatabaseSource
    from migrator.selection import Selection

    return DatabaseSource(
        parse_db_url(url, settings),
        storage=options.get("storage"),
        force=bool(options.get("force")),
        connections=min(max(settings.concurrency, 1), 16),
        selection=Selection.from_options(options.get("selection")),
    )
