"""A stopped Orthanc's index database (PostgreSQL or MySQL plugins) as a source."""

from __future__ import annotations

from typing import Any

from migrator.config import Settings
from migrator.ends.base import Source
from migrator.errors import UsageError


def open_database_source(url: str, settings: Settings, options: dict[str, Any]) -> Source:
    """The instances of an Orthanc whose index lives in the database at `url`."""
    raise UsageError("Orthanc index databases are not supported yet")
