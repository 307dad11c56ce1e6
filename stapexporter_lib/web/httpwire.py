"""The bytes on an HTTP connection, below the handler: request header
parsing within limits, canned answers for requests refused before the
application sees them, socket shut-down helpers, and which client a peer
address counts as.

Owns the header limits and parser.  Must not know about scripts, sessions or
the server's slots (``http.py``).
"""

import ipaddress
import os
import re
import select
import socket
import struct

from gevent import pywsgi

MAX_HEADER_LINE = 8190
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024


def canned(status: str, reason: str) -> bytes:
    body = (reason + "\n").encode()
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


TOO_MANY_CONNECTIONS = canned("503 Service Unavailable",
                                "Too many connections; try again later.").replace(
    b"Connection: close\r\n", b"Connection: close\r\nRetry-After: 1\r\n")
HEADERS_TOO_LARGE = canned("431 Request Header Fields Too Large",
                             "Request headers too large.")
REQUEST_TIMEOUT = canned("408 Request Timeout", "Request not received in time.")
BAD_REQUEST = canned("400 Bad Request", "Bad request.")


class HeadersTooLarge(ValueError):
    """Header lines too long, too many, or too much in all."""


class BadHeaders(pywsgi._InvalidClientRequest):
    """Headers that are malformed, incomplete or contradict each other."""


_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Headers:
    """Request headers, parsed without the email package (which costs more
    than the rest of a small request).  Offers what pywsgi uses of its own
    header objects: get/getheader, del, ``headers`` lines, ``typeheader``,
    ``status``."""

    status = ""

    def __init__(self, pairs):
        self._pairs = pairs  # [(name, value)] in arrival order

    def get(self, name, default=None):
        name = name.lower()
        for key, value in self._pairs:
            if key.lower() == name:
                return value
        return default

    getheader = get

    def __contains__(self, name):
        return self.get(name) is not None

    def __delitem__(self, name):
        name = name.lower()
        self._pairs = [(k, v) for k, v in self._pairs if k.lower() != name]

    @property
    def headers(self):
        return ["%s: %s\r\n" % (k, v) for k, v in self._pairs]

    @property
    def typeheader(self):
        return self.get("content-type")


def read_headers(rfile) -> Headers:
    """Read header lines up to the blank line, within the limits.  Raises
    HeadersTooLarge (431), or BadHeaders (400) for malformed lines,
    folded lines, Content-Length together with Transfer-Encoding, or an end
    of input before the blank line."""
    pairs = []
    total = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 2)
        if len(line) > MAX_HEADER_LINE and not line.endswith(b"\n"):
            raise HeadersTooLarge("header line longer than %d bytes" % MAX_HEADER_LINE)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise HeadersTooLarge("headers larger than %d bytes" % MAX_HEADER_BYTES)
        if not line:
            # A request is complete only with its blank line; it also ends
            # this way when the server shut a slow client's connection.
            raise BadHeaders("Connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            break
        if len(pairs) >= MAX_HEADERS:
            raise HeadersTooLarge("more than %d headers" % MAX_HEADERS)
        text = line.decode("latin-1").rstrip("\r\n")
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN_RE.match(name):
            raise BadHeaders("Invalid header line: %r" % text[:100])
        pairs.append((name, value.strip(" \t")))
    headers = Headers(pairs)
    if headers.get("transfer-encoding") is not None and headers.get("content-length") is not None:
        # Request smuggling territory: refuse rather than pick one.
        raise BadHeaders("Both Content-Length and Transfer-Encoding given")
    return headers


def abort_on_close(sock) -> None:
    """Make closing SOCK reset the connection instead of leaving its unsent
    data queued in the kernel for a client that does not read."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass


def shutdown(sock) -> None:
    """Shut the connection down under whatever greenlet is waiting on it: it
    then sees end-of-file (or EPIPE) and ends as for a client that left.
    Done on a duplicate descriptor, beneath any TLS layer."""
    try:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
    except (OSError, ValueError):
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


def has_input(sock) -> bool:
    """True if bytes (or an end-of-file) wait on SOCK: not idle after all."""
    try:
        readable, _, _ = select.select([sock.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def client_key(address) -> str:
    """The client a peer ADDRESS counts as (for the per-client cap): its IP
    address; for IPv6 its /64, which a single host or site usually has."""
    host = str(address[0] if isinstance(address, tuple) and address else address)
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))
