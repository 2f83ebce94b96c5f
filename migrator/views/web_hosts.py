"""Which ``Host`` headers `migrator serve` answers: a defence against DNS rebinding.

A page on an attacker's domain can make that name resolve to 127.0.0.1 (or to any address
of the local network) once it is loaded, then read a local server's answers as if they
were its own. Every such request carries the attacker's name in its Host header, so the
server answers only requests for:

- an IP address (IPv4, or IPv6 in brackets): a page loaded from an address has that
  address as its origin, no rebinding is possible;
- ``localhost``, this machine's host name and fully qualified name, and the name the
  server was told to listen on (``--host``);
- the names given with ``--allow-host`` (such as a reverse proxy's public name); ``*``
  turns the check off.

A request without a Host header (HTTP/1.0 tools; browsers always send one) is answered.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

_PORT_RE = re.compile(r":[0-9]*")


class HostCheck:
    """The host names a server answers for (see the module docstring)."""

    def __init__(self, bound: str, allowed: Iterable[str] = ()) -> None:
        names = {"localhost", bound, *allowed}
        # Looked up once, at start: getfqdn may wait for a slow DNS server.
        names.update((socket.gethostname(), socket.getfqdn()))
        self.any = "*" in names
        self.names = frozenset(_normal(name) for name in names if name)

    def accepts(self, header: str | None) -> bool:
        """Whether a request with this Host header (None: none) may be answered."""
        if header is None or self.any:
            return True
        host = hostname(header)
        if host is None:
            return False
        return _is_ip(host) or host in self.names


def hostname(header: str) -> str | None:
    """The host name of a Host header, lower case, without port or final dot; None when
    the header is malformed."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not _PORT_RE.fullmatch(text[end + 1 :] or ":"):
            return None
        return text[: end + 1]
    name, colon, port = text.partition(":")
    if colon and not port.isdigit():
        return None
    return _normal(name) or None


def _normal(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return False
    return True
