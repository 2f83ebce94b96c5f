"""A DICOMweb service (QIDO-RS, WADO-RS, STOW-RS) as a source or a target."""

from __future__ import annotations

from typing import Any

from migrator.config import Settings
from migrator.ends.base import Source, Target
from migrator.errors import UsageError


def open_dicomweb_source(url: str, settings: Settings, options: dict[str, Any]) -> Source:
    """A DICOMweb source (QIDO-RS listing, WADO-RS fetch)."""
    raise UsageError("DICOMweb sources are not supported yet")


def open_dicomweb_target(url: str, settings: Settings) -> Target:
    """A DICOMweb target (STOW-RS)."""
    raise UsageError("DICOMweb targets are not supported yet")
