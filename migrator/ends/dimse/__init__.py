"""A DICOM peer over DIMSE (C-FIND, C-GET/C-MOVE, C-STORE) as a source or a target.

The URL is ``dicom://CALLED_AE@host:port``: the peer's AE title, not credentials. Our
own AE title is ``settings.dimse_aet`` (``--aet``, ``[dimse] aet``).
"""

from __future__ import annotations

from typing import Any

from migrator.config import Settings
from migrator.ends.base import Source, Target


def open_dimse_source(url: str, settings: Settings, options: dict[str, Any]) -> Source:
    """A DIMSE source (C-FIND listing, C-GET or C-MOVE fetch)."""
    from migrator.ends.dimse.peer import parse_dicom_url
    from migrator.ends.dimse.source import DimseSource
    from migrator.selection import Selection

    peer = parse_dicom_url(url, "source", settings.dimse_aet)
    selection = Selection.from_options(options.get("selection"))
    return DimseSource(peer, settings, selection)


def open_dimse_target(url: str, settings: Settings) -> Target:
    """A DIMSE target (C-STORE; C-FIND for verify)."""
    from migrator.ends.dimse.peer import parse_dicom_url
    from migrator.ends.dimse.target import DimseTarget

    peer = parse_dicom_url(url, "target", settings.dimse_aet)
    return DimseTarget(peer, settings)
