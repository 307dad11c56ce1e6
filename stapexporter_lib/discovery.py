"""Prometheus HTTP service discovery: the ``GET /targets`` document.

Prometheus's ``http_sd_configs`` reads a JSON list of target groups; we give
one group per script, so a single Prometheus job scrapes every script on
every host.  This module owns that document and the address it advertises:
the ``Host`` the client used (so it works behind NAT and with IPv6), checked
strictly, since a hostile ``Host`` must never be echoed into a scrape
configuration; else the connection's local address; or ``--advertise-address``.

Pure functions only: it reads no directory, starts nothing and knows no HTTP
server (the app passes the request's WSGI environ in).

Owns the ``/targets`` document and the Host checks.  Must not start
scripts, read the scripts directory or answer HTTP itself.
"""

import ipaddress
import json
import re
from typing import Callable, Dict, List, Optional, Tuple

# The WSGI environ key under which the server puts a callable returning the
# connection's local socket address (see server.py).
SOCKNAME_KEY = "stapexporter.sockname"

CONTENT_TYPE_JSON = "application/json; charset=utf-8"

DEFAULT_PORTS = {"http": 80, "https": 443}
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


def local_address(environ) -> Optional[Address]:
    """The connection's local (host, port), if the server told us; IPv4
    addresses reached over a dual-stack socket lose their ``::ffff:``."""
    sockname: Optional[Callable[[], tuple]] = environ.get(SOCKNAME_KEY)
    if sockname is None:
        return None
    try:
        address = sockname()
    except OSError:
        return None
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    host = str(address[0]).split("%", 1)[0]
    try:
        mapped = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        host = str(mapped.ipv4_mapped)
    return host, int(address[1])


def request_address(environ) -> Tuple[Optional[str], Optional[str]]:
    """(HOST:PORT the client used, or None; the refused Host header, or None).
    A missing or malformed ``Host`` falls back to the local address."""
    scheme = environ.get("wsgi.url_scheme", "http")
    raw = environ.get("HTTP_HOST")
    refused = None
    if raw is not None:
        parsed = parse_host_port(raw, DEFAULT_PORTS.get(scheme, 80))
        if parsed is not None:
            return format_address(*parsed), None
        refused = raw
    local = local_address(environ)
    return (format_address(*local) if local else None), refused


def target_groups(names: List[str], address: str, scheme: str) -> List[Dict]:
    """One http_sd target group per script name.  ``__metrics_path__`` is the
    path as Prometheus wants it: not percent-encoded (Prometheus encodes it
    when it builds the scrape URL)."""
    groups = []
    for name in names:
        labels = {"__metrics_path__": "/" + name, "script": name}
        if scheme == "https":
            labels["__scheme__"] = "https"
        groups.append({"targets": [address], "labels": labels})
    return groups


def render(groups: List[Dict]) -> bytes:
    """The JSON document: ASCII only, every control character escaped."""
    return (json.dumps(groups, ensure_ascii=True, indent=1) + "\n").encode("ascii")
