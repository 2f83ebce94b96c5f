"""Orthanc endpoints given as URLs, with their credentials kept apart.

A URL such as ``http://alice:s3cret@pacs:8042/`` is split into a clean base URL and the
credentials. Only `Endpoint.display` (never carrying a password) is ever written to the
ledger, logs or reports. Credentials may also come from the config file or from the
environment (``MIGRATOR_SOURCE_PASSWORD``...) so that they stay out of sight of ``ps``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from migrator.errors import UsageError

_HOST_RE = re.compile(r"^[A-Za-z0-9._\-]+$|^\[[0-9A-Fa-f:.]+\]$")


@dataclass(frozen=True)
class Endpoint:
    """An Orthanc REST base URL (always ending with '/') and optional basic-auth credentials."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # PEM file of the CA(s) trusted for an https URL; None: the certifi bundle.
    ca_file: str | None = None

    @property
    def auth(self) -> tuple[str, str] | None:
        """Credentials for httpx, or None."""
        if self.username is None:
            return None
        return (self.username, self.password or "")

    @property
    def display(self) -> str:
        """The URL as shown to people and stored in the ledger: user name kept, no password."""
        if self.username is None:
            return self.url
        parts = urlsplit(self.url)
        netloc = f"{quote(self.username, safe='')}@{parts.netloc}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    @property
    def host_port(self) -> str:
        """`host:port` of the endpoint, for job names and messages."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"

    def with_credentials(self, username: str | None, password: str | None) -> Endpoint:
        """A copy whose credentials are replaced where the arguments are not None."""
        return replace(
            self,
            username=username if username is not None else self.username,
            password=password if password is not None else self.password,
        )


def parse_endpoint(text: str, *, role: str) -> Endpoint:
    """Parse and validate a URL given for `role` ("source" or "target").

    Raises UsageError with one line naming the role when the URL is malformed.
    """
    raw = (text or "").strip()
    if not raw:
        raise UsageError(f"{role} URL is empty")
    if "://" not in raw:
        raise UsageError(f"{role} URL {redact(raw)!r} has no scheme: use http://host:port/")
    if not raw.isprintable():
        # httpx refuses control characters later, with an exception of its own.
        raise UsageError(f"{role} URL {redact(raw)!r} contains control characters")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{role} URL {redact(raw)!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{role} URL {redact(raw)!r}: scheme must be http or https")
    host = parts.hostname
    if not host or not _HOST_RE.match(parts.netloc.rpartition("@")[2].rsplit(":", 1)[0] or "x"):
        raise UsageError(f"{role} URL {redact(raw)!r} has no valid host")
    if parts.query or parts.fragment:
        raise UsageError(f"{role} URL {redact(raw)!r} must not carry a query or fragment")
    hostpart = f"[{host}]" if ":" in host else host
    netloc = hostpart if port is None else f"{hostpart}:{port}"
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Endpoint(urlunsplit((parts.scheme, netloc, path, "", "")), username, password)


def redact(text: str) -> str:
    """Hide any password embedded in URLs inside `text` (for messages about bad input)."""
    # The password runs to the LAST '@' before the path, as urlsplit reads it: a password
    # with an unescaped '@' or a space in it ("p@ss word") must not be half shown.
    return re.sub(r"(://[^/?#:]*):[^/?#]*@", r"\1:***@", text)
