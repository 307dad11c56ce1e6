"""The HTTP server: pywsgi, hardened for a root daemon on a network.

* TCP_NODELAY on accepted sockets: pywsgi writes headers and body separately,
  and without it a keep-alive client waits for the delayed ACK (~40 ms).
* A deadline for the request line and headers (slowloris) that also bounds
  how long a keep-alive connection may sit idle.
* Limits: request line (414), header lines, header count and total size (431).
* HTTP/0.9 requests and requests carrying both Content-Length and
  Transfer-Encoding are rejected (400); a body sent with GET/HEAD is not
  drained: the response is sent and the connection closed.
* A cap on simultaneous connections: beyond it a short 503 and close.
* Running out of file descriptors (EMFILE) pauses accepting with backoff
  instead of printing a traceback per attempt; it recovers by itself.
* Request-derived text is escaped in every log line.
"""

import errno
import logging
import re
import socket

import gevent
from gevent import pywsgi

from .session import escape_line

log = logging.getLogger("stap-exporter")

MAX_REQUEST_LINE = pywsgi.MAX_REQUEST_LINE  # 8192: pywsgi answers 414 beyond it
MAX_HEADER_LINE = 8190
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024

DEFAULT_HEADER_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 512


def _canned(status: str, reason: str) -> bytes:
    body = (reason + "\n").encode()
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


_TOO_MANY_CONNECTIONS = _canned("503 Service Unavailable",
                                "Too many connections; try again later.").replace(
    b"Connection: close\r\n", b"Connection: close\r\nRetry-After: 1\r\n")
_HEADERS_TOO_LARGE = _canned("431 Request Header Fields Too Large",
                             "Request headers too large.")
_REQUEST_TIMEOUT = _canned("408 Request Timeout", "Request not received in time.")
_BAD_REQUEST = _canned("400 Bad Request", "Bad request.")


class HeaderTimeout(socket.timeout):
    """The client did not send its request line and headers in time."""


class HeadersTooLarge(ValueError):
    """Header lines too long, too many, or too much in all."""


class AcceptPaused(Exception):
    """accept() failed for lack of resources; the server pauses accepting.
    Registered with the hub as not-an-error, so no traceback is printed."""


_VERSION_RE = re.compile(r"^HTTP/(\d{1,3})\.(\d{1,3})$")
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


def _read_headers(rfile) -> Headers:
    """Read header lines up to the blank line, within the limits.  Raises
    HeadersTooLarge, or an _InvalidClientRequest (400) for malformed lines,
    folded lines, or Content-Length together with Transfer-Encoding."""
    pairs = []
    total = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 2)
        if len(line) > MAX_HEADER_LINE and not line.endswith(b"\n"):
            raise HeadersTooLarge("header line longer than %d bytes" % MAX_HEADER_LINE)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise HeadersTooLarge("headers larger than %d bytes" % MAX_HEADER_BYTES)
        if line in (b"\r\n", b"\n", b""):
            break
        if len(pairs) >= MAX_HEADERS:
            raise HeadersTooLarge("more than %d headers" % MAX_HEADERS)
        text = line.decode("latin-1").rstrip("\r\n")
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN_RE.match(name):
            raise pywsgi._InvalidClientRequest("Invalid header line: %r" % text[:100])
        pairs.append((name, value.strip(" \t")))
    headers = Headers(pairs)
    if headers.get("transfer-encoding") is not None and headers.get("content-length") is not None:
        # Request smuggling territory: refuse rather than pick one.
        raise pywsgi._InvalidClientRequest("Both Content-Length and Transfer-Encoding given")
    return headers


class Handler(pywsgi.WSGIHandler):
    """pywsgi's handler with the limits described in the module docstring."""

    _deadline = None

    def handle_one_request(self):
        # One deadline covers waiting for the request line (also the idle time
        # of a keep-alive connection) and reading the headers; read_request()
        # cancels it once the headers are in.  One timer per connection,
        # restarted for each request.
        if self._deadline is None:
            self._deadline = gevent.Timeout(self.server.header_timeout,
                                            HeaderTimeout("request timeout"))
        self._deadline.start()
        try:
            return super().handle_one_request()
        except HeaderTimeout:
            return None
        finally:
            self._deadline.cancel()

    def _write_with_headers(self, data):
        # pywsgi sends the headers and the body in two writes; one is enough
        # (and saves a system call per scrape).
        if self.response_use_chunked or len(data) > 256 * 1024:
            return super()._write_with_headers(data)
        self.headers_sent = True
        self.finalize_headers()
        if self.response_use_chunked:  # decided by finalize_headers
            towrite = bytearray()
            self._write_head(towrite)
            self._sendall(towrite)
            return self._write(data)
        towrite = bytearray()
        self._write_head(towrite)
        towrite += data
        self._sendall(towrite)

    def _write_head(self, towrite: bytearray) -> None:
        towrite += b"HTTP/1.1 "
        towrite += self.status
        towrite += b"\r\n"
        for header, value in self.response_headers:
            towrite += header
            towrite += b": "
            towrite += value
            towrite += b"\r\n"
        towrite += b"\r\n"

    def log_request(self):
        # Formatting the access-log line costs more than the rest of a small
        # request's bookkeeping: only do it when it will be written.
        if log.isEnabledFor(logging.DEBUG):
            super().log_request()

    def read_requestline(self):
        try:
            return super().read_requestline()
        except HeaderTimeout:
            # No (complete) request line in time: just close.
            raise socket.error(errno.ETIMEDOUT, "request line timeout") from None

    def _check_http_version(self):
        # pywsgi's own check raises IndexError on "HTTP/1" and accepts 0.9.
        m = _VERSION_RE.match(self.request_version)
        return bool(m) and (1, 0) <= (int(m.group(1)), int(m.group(2))) < (2, 0)

    def MessageClass(self, rfile, *args):
        return _read_headers(rfile)

    def read_request(self, raw_requestline):
        if len(raw_requestline.split()) != 3:
            raise pywsgi._InvalidClientRequest(
                "Invalid request line (HTTP/0.9 is not supported): %r" % raw_requestline[:100])
        result = super().read_request(raw_requestline)
        self._deadline.cancel()
        if self.content_length or self.headers.get("transfer-encoding") is not None:
            # We never read request bodies: answer, then close instead of
            # draining what may be an endless body.
            self.content_length = 0
            del self.headers["transfer-encoding"]
            self.close_connection = True
        return result

    def _handle_client_error(self, ex):
        if isinstance(ex, HeaderTimeout):
            return ("408", _REQUEST_TIMEOUT)
        if isinstance(ex, HeadersTooLarge):
            self.log_error("Request rejected (from %s): %s", self.client_address, ex)
            return ("431", _HEADERS_TOO_LARGE)
        # Anything else raised while parsing a request is still the client's
        # doing: one log line, a 400, never a traceback.
        self.log_error("Invalid request (from %s): %s", self.client_address,
                       getattr(ex, "formatted_message", None) or str(ex) or
                       ex.__class__.__name__)
        return ("400", _BAD_REQUEST)

    def log_error(self, msg, *args):
        try:
            message = msg % args if args else msg
        except TypeError:
            message = "%r %r" % (msg, args)
        log.info("http: client=%s %s", _peer(self.client_address),
                 escape_line(str(message))[:500])


def _peer(address) -> str:
    if isinstance(address, tuple) and address:
        return "%s:%s" % (address[0], address[1]) if len(address) > 1 else str(address[0])
    return str(address or "-")


class Server(pywsgi.WSGIServer):
    """WSGIServer with the connection cap, TCP_NODELAY and EMFILE handling."""

    handler_class = Handler

    def __init__(self, listener, application, header_timeout=DEFAULT_HEADER_TIMEOUT,
                 max_connections=DEFAULT_MAX_CONNECTIONS, **kwargs):
        super().__init__(listener, application, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.connections = 0
        self._emfile_logged = False
        hub = gevent.get_hub()
        if AcceptPaused not in hub.NOT_ERROR:
            hub.NOT_ERROR = tuple(hub.NOT_ERROR) + (AcceptPaused,)

    def do_read(self):
        try:
            result = super().do_read()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                if not self._emfile_logged:
                    log.error("accept: %s; pausing new connections until descriptors"
                              " free up", exc.strerror)
                    self._emfile_logged = True
                raise AcceptPaused() from None
            raise
        if self._emfile_logged:
            log.info("accept: accepting connections again")
            self._emfile_logged = False
        return result

    def handle(self, sock, address):
        if self.connections >= self.max_connections:
            self._refuse(sock)
            return
        self.connections += 1
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            super().handle(sock, address)
        finally:
            self.connections -= 1

    def _refuse(self, sock):
        try:
            sock.settimeout(1.0)
            sock.sendall(_TOO_MANY_CONNECTIONS)
        except OSError:
            pass
        finally:
            sock.close()
