"""Open the end a URL (or a folder path) names, with its credentials from the settings.

The scheme decides the kind (see `migrator.ends.base`); each kind's module is imported
only when it is used, so that a replicate between Orthancs loads no DIMSE code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from migrator.config import Settings
from migrator.endpoints import Endpoint, parse_endpoint, shown_url
from migrator.ends.base import Source, Target
from migrator.errors import UsageError

__all__ = ["end_kind", "endpoint_from", "open_source", "open_target", "orthanc_client"]

# URL scheme -> kind of end.
SCHEMES = {
    "http": "orthanc",
    "https": "orthanc",
    "dicomweb+http": "dicomweb",
    "dicomweb+https": "dicomweb",
    "dicom": "dimse",
    "postgresql": "database",
    "postgres": "database",
    "mysql": "database",
}


def end_kind(text: str, role: str = "source") -> str:
    """The kind of end `text` names: a URL's scheme decides; no scheme is a folder."""
    if "://" not in text:
        return "folder"
    scheme = text.partition("://")[0].lower()
    kind = SCHEMES.get(scheme)
    if kind is None:
        known = ", ".join(sorted({s + "://" for s in SCHEMES}))
        raise UsageError(f"{role} URL {shown_url(text)!r}: unknown scheme (known: {known})")
    return kind


def endpoint_from(url: str | None, role: str, settings: Settings) -> Endpoint:
    """An HTTP endpoint from the command line or config, with credentials from settings."""
    url = url or getattr(settings, f"{role}_url")
    if not url:
        raise UsageError(f"no {role} URL given (argument or [{role}] url in the config)")
    endpoint = parse_endpoint(url, role=role)
    endpoint = endpoint.with_credentials(
        getattr(settings, f"{role}_username"), getattr(settings, f"{role}_password")
    )
    ca_file = getattr(settings, f"{role}_ca_file")
    return replace(endpoint, ca_file=ca_file) if ca_file else endpoint


def orthanc_client(endpoint: Endpoint, role: str, settings: Settings) -> Any:
    """An Orthanc REST client sized for the run's concurrency."""
    from migrator.ends.orthanc.client import OrthancClient

    return OrthancClient(
        endpoint,
        role,
        connections=settings.concurrency + 2,
        timeout=settings.timeout,
        connect_timeout=settings.connect_timeout,
    )


def _url(url: str | None, role: str, settings: Settings) -> str:
    url = url or getattr(settings, f"{role}_url")
    if not url:
        raise UsageError(f"no {role} URL given (argument or [{role}] url in the config)")
    return url


def open_target(url: str | None, settings: Settings) -> Target:
    """The target named by `url` (or `[target] url`), not yet preflighted."""
    url = _url(url, "target", settings)
    kind = end_kind(url, "target")
    if kind == "orthanc":
        from migrator.ends.orthanc.target import OrthancTarget

        endpoint = endpoint_from(url, "target", settings)
        return OrthancTarget(orthanc_client(endpoint, "target", settings))
    if kind == "dicomweb":
        from migrator.ends.dicomweb import open_dicomweb_target

        return open_dicomweb_target(url, settings)
    if kind == "dimse":
        from migrator.ends.dimse import open_dimse_target

        return open_dimse_target(url, settings)
    raise UsageError(f"a {kind} cannot be a target: give an Orthanc, DICOMweb or DICOM URL")


def open_source(
    url: str | None, settings: Settings, *, options: dict[str, Any] | None = None
) -> Source:
    """The source named by `url` (or `[source] url`), not yet preflighted. `options` are
    the job's (a worker joining a job reads the source as its first run did)."""
    url = _url(url, "source", settings)
    options = options or {}
    kind = end_kind(url)
    if kind == "orthanc":
        from migrator.ends.orthanc.source import RestSource
        from migrator.selection import Selection

        client = orthanc_client(endpoint_from(url, "source", settings), "source", settings)
        selection = Selection.from_options(options.get("selection"))
        return RestSource(client, settings.retry, settings.page_size, selection=selection)
    if kind == "folder":
        from migrator.ends.folder.source import FolderSource
        from migrator.selection import Selection

        selection = Selection.from_options(options.get("selection"))
        return FolderSource(url, options.get("storage"), selection)
    if kind == "dicomweb":
        from migrator.ends.dicomweb import open_dicomweb_source

        return open_dicomweb_source(url, settings, options)
    if kind == "dimse":
        from migrator.ends.dimse import open_dimse_source

        return open_dimse_source(url, settings, options)
    from migrator.ends.database import open_database_source

    return open_database_source(url, settings, options)
