"""Host and port as options and ``Host`` headers write them: parsed
strictly (a hostile ``Host`` must never be echoed into a scrape
configuration) and formatted one way per address."""

import ipaddress
import re
from typing import Optional, Tuple

MAX_PORT = 65535
MAX_HOST_HEADER = 300
MAX_DNS_NAME = 253

_PORT_RE = re.compile(r"^[0-9]{1,5}$")
# RFC 1123 host names (underscores tolerated: some internal names have them).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_RE = re.compile(r"^%s(?:\.%s)*\.?$" % (_LABEL, _LABEL))

Address = Tuple[str, int]


def parse_host_port(text: str, default_port: Optional[int] = None) -> Optional[Address]:
    """(host, port) from a ``Host`` header or a HOST:PORT option value, or
    None when TEXT is not a plain host name, IPv4 address or bracketed IPv6
    address with an optional port in 1-65535.  Without a port, DEFAULT_PORT
    is used (None: a port is required).  IPv6 hosts come back without
    brackets, in their compressed lower-case form; zone ids (``%eth0``) are
    refused."""
    if not text or len(text) > MAX_HOST_HEADER or not text.isascii():
        return None
    host, port_text = _split_host_port(text)
    if host is None:
        return None
    if port_text is None:
        port = default_port
    elif _PORT_RE.match(port_text) and 1 <= int(port_text) <= MAX_PORT:
        port = int(port_text)
    else:
        return None
    if port is None or not _valid_host(host):
        return None
    if ":" in host:  # one spelling per address: the instance label must not vary
        host = str(ipaddress.IPv6Address(host))
    return host, port


def _split_host_port(text: str) -> Tuple[Optional[str], Optional[str]]:
    """(host, port text or None); host None when the brackets are wrong."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None, None
        host, rest = text[1:end], text[end + 1:]
        if not rest:
            return host, None
        if not rest.startswith(":") or ":" not in host:
            return None, None
        return host, rest[1:]
    if text.count(":") > 1:  # an IPv6 address needs brackets
        return None, None
    host, colon, port = text.partition(":")
    return host, (port if colon else None)


def _valid_host(host: str) -> bool:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return "%" not in host
    return len(host) <= MAX_DNS_NAME and _DNS_RE.match(host) is not None


def format_address(host: str, port: int) -> str:
    """HOST:PORT, IPv6 addresses in brackets."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
