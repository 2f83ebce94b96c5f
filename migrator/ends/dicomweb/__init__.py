"""A DICOMweb service (QIDO-RS, WADO-RS, STOW-RS) as a source or a target.

URL: ``dicomweb+http(s)://[user:password@]host:port/PATH``, PATH being the service root
(``dicomweb+http://pacs:8042/dicom-web``). Basic-auth credentials come from the URL or
the settings (``[source] username``/``password``, ``MIGRATOR_SOURCE_PASSWORD``...), a
bearer token from ``[source] token`` / ``MIGRATOR_SOURCE_TOKEN`` (the target's alike).
The URL shown and stored keeps its ``dicomweb+`` prefix and never a password.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from migrator.config import Settings
from migrator.endpoints import parse_endpoint
from migrator.ends.base import Source, Target
from migrator.errors import UsageError

__all__ = ["open_dicomweb_source", "open_dicomweb_target"]


def _client(url: str, role: str, settings: Settings) -> Any:
    """A DICOMweb client for `url`, credentials and TLS trust from the settings."""
    from migrator.ends.dicomweb.client import PREFIX, DicomWebClient

    if not url.lower().startswith(PREFIX):
        raise UsageError(f"{role} URL must start with {PREFIX}http:// or {PREFIX}https://")
    endpoint = parse_endpoint(url[len(PREFIX) :], role=role).with_credentials(
        getattr(settings, f"{role}_username"), getattr(settings, f"{role}_password")
    )
    ca_file = getattr(settings, f"{role}_ca_file")
    if ca_file:
        endpoint = replace(endpoint, ca_file=ca_file)
    return DicomWebClient(
        endpoint,
        role,
        token=getattr(settings, f"{role}_token"),
        connections=settings.concurrency + 2,
        timeout=settings.timeout,
        connect_timeout=settings.connect_timeout,
    )


def open_dicomweb_source(url: str, settings: Settings, options: dict[str, Any]) -> Source:
    """A DICOMweb source (QIDO-RS listing, WADO-RS fetch), with the job's selection."""
    from migrator.ends.dicomweb.source import DicomWebSource
    from migrator.selection import Selection
    from migrator.units import parse_memory

    selection = Selection.from_options(options.get("selection"))
    return DicomWebSource(
        _client(url, "source", settings),
        settings.retry,
        settings.page_size,
        selection,
        memory=parse_memory(settings.max_memory),
    )


def open_dicomweb_target(url: str, settings: Settings) -> Target:
    """A DICOMweb target (STOW-RS; verify by WADO-RS and QIDO-RS)."""
    from migrator.ends.dicomweb.target import DicomWebTarget

    # ``--batch 1``: one instance per STOW-RS request, single stores too.
    most = 1 if settings.batch == 1 else 32
    return DicomWebTarget(_client(url, "target", settings), most=most)
