"""A DICOM peer over DIMSE (C-FIND, C-GET/C-MOVE, C-STORE) as a source or a target."""

from __future__ import annotations

from typing import Any

from migrator.config import Settings
from migrator.ends.base import Source, Target
from migrator.errors import UsageError


def open_dimse_source(url: str, settings: Settings, options: dict[str, Any]) -> Source:
    """A DIMSE source (C-FIND listing, C-GET or C-MOVE fetch)."""
    raise UsageError("DICOM (DIMSE) sources are not supported yet")


def open_dimse_target(url: str, settings: Settings) -> Target:
    """A DIMSE target (C-STORE)."""
    raise UsageError("DICOM (DIMSE) targets are not supported yet")
