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
from typing import Callable, Dict, List, Optional, Tuple

from ..addresses import Address, format_address, parse_host_port

# The WSGI environ key under which the server puts a callable returning the
# connection's local socket address (see server.py).
SOCKNAME_KEY = "stapexporter.sockname"

CONTENT_TYPE_JSON = "application/json; charset=utf-8"

DEFAULT_PORTS = {"http": 80, "https": 443}
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
