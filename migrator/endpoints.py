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

    The credentials are everything between ``scheme://`` and the last '@', so a password
    may hold '#', '/', '?', '@' or ':' as typed (percent-encoding works too). Raises
    UsageError with one line naming the role when the URL is malformed; the message shows
    the URL with its password hidden and never the parser's own words (they may quote a
    piece of the password).
    """
    raw = (text or "").strip()
    if not raw:
        raise UsageError(f"{role} URL is empty")
    shown = shown_url(raw)
    if "://" not in raw:
        raise UsageError(f"{role} URL {shown!r} has no scheme: use http://host:port/")
    if not raw.isprintable():
        # httpx refuses control characters later, with an exception of its own.
        raise UsageError(f"{role} URL {shown!r} contains control characters")
    scheme, _, rest = raw.partition("://")
    if scheme.lower() not in ("http", "https"):
        raise UsageError(f"{role} URL {shown!r}: scheme must be http or https")
    # The credentials run to the last '@', wherever it is: a password may hold '#', '/',
    # '?' or '@' unescaped. (An '@' in the path must be written %40.)
    userinfo, at, rest = rest.rpartition("@")
    try:
        # No credentials left in what the parser sees: its errors cannot quote them.
        parts = urlsplit(f"{scheme.lower()}://{rest}")
        port = parts.port
    except ValueError:
        raise UsageError(f"{role} URL {shown!r} is malformed: {_why(rest)}") from None
    host = parts.hostname
    if not host or not _HOST_RE.match(re.sub(r":[0-9]*$", "", parts.netloc) or "x"):
        raise UsageError(f"{role} URL {shown!r} has no valid host")
    if parts.query or parts.fragment:
        raise UsageError(f"{role} URL {shown!r} must not carry a query or fragment")
    hostpart = f"[{host}]" if ":" in host else host
    netloc = hostpart if port is None else f"{hostpart}:{port}"
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user)
        password = unquote(secret) if colon else None
    return Endpoint(urlunsplit((parts.scheme, netloc, path, "", "")), username, password)


def _why(rest: str) -> str:
    """Why a URL without credentials did not parse, in our words."""
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "[" in netloc or "]" in netloc:
        return "invalid IPv6 address"
    return "the port must be a number between 0 and 65535"


def shown_url(raw: str) -> str:
    """The URL for an error message: no password, even without a scheme."""
    if "://" in raw:
        return redact(raw)
    head, at, tail = raw.rpartition("@")
    user, colon, _ = head.partition(":")
    return f"{user}:***@{tail}" if at and colon else raw


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def redact(text: str) -> str:
    """Hide any password embedded in URLs inside `text` (for messages about bad input).

    After each ``scheme://``, the credentials run to the last '@' before the next URL (or
    the end): a password holding '@', '/', '#', '?' or a space is hidden whole. The user
    name (up to the first ':') stays; a URL without ':' in its credentials has no password.
    """
    starts = [m.end() for m in _SCHEME_RE.finditer(text)]
    if not starts:
        return text
    out: list[str] = []
    pos = 0
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        at = text.rfind("@", start, end)
        colon = text.find(":", start, at)
        if at < 0 or colon < 0:
            continue
        out.append(text[pos : colon + 1])
        out.append("***@")
        pos = at + 1
    out.append(text[pos:])
    return "".join(out)
