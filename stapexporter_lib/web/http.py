"""The HTTP server: pywsgi, hardened for a root daemon on a network.

Owns the connection handling (deadlines, limits, slots).  Must not know
scripts or routes (that is app.py), block the hub, or keep defaults of its
own (server.py passes the configuration).

* TCP_NODELAY on accepted sockets: pywsgi writes headers and body separately,
  and without it a keep-alive client waits for the delayed ACK (~40 ms).
* Keep-alive: a connection is closed for idleness only after
  --header-timeout with no byte of a new request; once the first byte of a
  request is in, the request is answered (408 if its request line and
  headers take longer than --header-timeout or HEAD_TIMEOUT, the shorter).
  Server-initiated closes happen between requests; when the server knows in
  advance (stopping, all slots taken, the client asked) the last response
  says Connection: close.
* A send deadline: a client that takes nothing of a response for
  --send-timeout is dropped (connection reset, its queued data freed).
* Read-ahead is bounded: accepted sockets get a small receive buffer, so a
  client pipelining requests without reading the answers is held back by
  TCP flow control instead of queueing megabytes here; their send buffer is
  capped too (SEND_BUFFER).
* Limits: request line (414), header lines, header count and total size (431).
* HTTP/0.9 requests and requests carrying both Content-Length and
  Transfer-Encoding are rejected (400); a body sent with GET/HEAD is not
  drained: the response is sent and the connection closed.
* --max-connections: when all slots are taken, the connection that has
  waited longest for its request (idle, or still sending its request line
  and headers) or stalled sending longest (at least STALLED_AFTER) is closed
  to make room; only when every connection is busy with a request does a
  new one get a short 503.  --max-connections-per-client caps one client
  address (an IPv6 /64) the same way, among its own connections.
* Running out of file descriptors (EMFILE) pauses accepting with backoff
  instead of printing a traceback per attempt; it recovers by itself.
* Request-derived text reaches the log only as quoted free text (logs.py).
"""

import collections
import errno
import logging
import re
import socket
import time
from typing import Optional

import gevent
from gevent import pywsgi

from .. import logs
from . import httpwire

log = logging.getLogger("stap-exporter")


# Per accepted socket (the kernel doubles it for its bookkeeping): room for a
# request's line and headers, not for megabytes of pipelined requests.
RECEIVE_BUFFER = 32 * 1024
# Likewise for what waits to be sent to a client that does not read: at most
# this much (doubled) per connection instead of the kernel's autotuned ~4 MiB.
SEND_BUFFER = 512 * 1024
# Responses go out in pieces this size, each with its own --send-timeout.
SEND_CHUNK = 256 * 1024
# A connection blocked this long in a send counts as stalled (may be dropped
# when its slot is needed).
STALLED_AFTER = 1.0
# Once its first byte is in, a request's line and headers must all be in
# within this many seconds (or --header-timeout, if shorter): a client sends
# them at once, one that drips them only holds a slot.
HEAD_TIMEOUT = 10.0
# How much of a client-caused error message goes into the log.
MAX_LOGGED_TEXT = 500
SHUTDOWN_POLL = 0.05


class HeaderTimeout(Exception):
    """The client did not send its request line and headers in time (not an
    OSError: pywsgi would take that for a dead connection and answer
    nothing, and a request whose first byte arrived is always answered)."""


class _IdleTimeout(Exception):
    """A keep-alive connection saw no new request for --header-timeout."""


class ClientDropped(OSError):
    """The server gave up sending to a client (it read nothing for
    --send-timeout, or its slot was taken).  Carries EPIPE so pywsgi treats
    it like a client that went away: no traceback, no 500, connection
    closed."""

    def __init__(self, reason: str):
        super().__init__(errno.EPIPE, reason)


class AcceptPaused(Exception):
    """accept() failed for lack of resources; the server pauses accepting.
    Registered with the hub as not-an-error, so no traceback is printed."""


_VERSION_RE = re.compile(r"^HTTP/(\d{1,3})\.(\d{1,3})$")


# What a connection is doing, for choosing one to drop when all slots are
# taken: IDLE ones (waiting for a request, nothing received), READING ones
# (request line and headers not all in) and SENDING ones stalled for
# STALLED_AFTER seconds may be dropped; BUSY ones never.
IDLE, READING, BUSY, SENDING = "idle", "reading", "busy", "sending"
_DOING = {IDLE: "idle", READING: "sending its request", SENDING: "stalled sending"}


class Handler(pywsgi.WSGIHandler):
    """pywsgi's handler with the limits described in the module docstring."""

    phase = IDLE
    phase_since = 0.0
    dropped = None      # why the server took this connection's slot, if it did
    client_key = None   # the client, as --max-connections-per-client counts them
    _deadline = None

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_since = time.monotonic()

    def handle(self):
        self.server.track(self)
        try:
            super().handle()
        except OSError:
            # Only the canned error response pywsgi sends after a failed
            # request can get here (a client that stopped reading).
            pass
        finally:
            self.server.untrack(self)

    def handle_one_request(self):
        if self.server.closing or not self._wait_for_request():
            return None
        # The first byte of a request is in: from here on it is answered
        # (408 if the rest does not arrive in time).  A new timer per
        # request: a restarted gevent.Timeout resumes with what was left of
        # it, and would cut a later request short.
        self._set_phase(READING)
        deadline = self._deadline = gevent.Timeout(min(self.server.header_timeout, HEAD_TIMEOUT),
                                                   HeaderTimeout("request timeout"))
        deadline.start()
        try:
            result = super().handle_one_request()
        except HeaderTimeout:
            result = ("408", httpwire.REQUEST_TIMEOUT)
        finally:
            deadline.close()
        if isinstance(result, tuple):
            # pywsgi sends this canned answer itself: bound that send too.
            self.socket.settimeout(self.server.send_timeout)
        return result

    def _wait_for_request(self) -> bool:
        """Wait up to --header-timeout for the first byte of the next
        request.  False when the connection is to be closed: the client
        closed it, it stayed idle, or the server needed its slot."""
        self._set_phase(IDLE)
        timer = gevent.Timeout(self.server.header_timeout, _IdleTimeout())
        timer.start()
        try:
            first = self.rfile.peek(1)
        except _IdleTimeout:
            logs.event(log, logging.DEBUG, "http", "closing idle connection after %g s"
                       " without a request", self.server.header_timeout,
                       client=_peer(self.client_address))
            return False
        except (OSError, ValueError):
            return False        # reset, failed TLS handshake, closed
        finally:
            timer.close()
        if not first and self.dropped:
            logs.event(log, logging.DEBUG, "http", "closed idle connection: %s",
                       self.dropped, client=_peer(self.client_address))
        return bool(first)

    def start_response(self, status, headers, exc_info=None):
        # Say so when this is the last response on the connection: the
        # client asked, a body we will not read followed, or the server is
        # stopping or full.
        if self.close_connection or self.server.closing or self.server.at_capacity():
            self.close_connection = True
            if not any(name.lower() == "connection" for name, _ in headers):
                headers = list(headers) + [("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def _sendall(self, data):
        # The send deadline: a client that takes nothing for --send-timeout
        # is dropped.  Sent in pieces so a slow but steady reader of a large
        # body is not mistaken for a stalled one.
        view = memoryview(data)
        sock = self.socket
        self._set_phase(SENDING)
        sock.settimeout(self.server.send_timeout)
        try:
            sent = 0
            while sent < len(view):
                sent += sock.send(view[sent:sent + SEND_CHUNK])
        except OSError as exc:
            if self.dropped is None and not isinstance(exc, socket.timeout):
                raise
            self._drop_stalled(self.dropped or "read nothing for %g s (--send-timeout)"
                               % self.server.send_timeout)
            raise ClientDropped("client stopped reading") from None
        finally:
            sock.settimeout(None)
            self._set_phase(BUSY)
        self.response_length += len(data)

    def _drop_stalled(self, reason: str) -> None:
        self.close_connection = True
        httpwire.abort_on_close(self.socket)
        self.server.log_throttled(logging.WARNING, "dropped connection: %s", reason,
                                  client=_peer(self.client_address))

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

    def _check_http_version(self):
        # pywsgi's own check raises IndexError on "HTTP/1" and accepts 0.9.
        m = _VERSION_RE.match(self.request_version)
        return bool(m) and (1, 0) <= (int(m.group(1)), int(m.group(2))) < (2, 0)

    def MessageClass(self, rfile, *args):
        return httpwire.read_headers(rfile)

    def read_request(self, raw_requestline):
        if len(raw_requestline.split()) != 3:
            raise pywsgi._InvalidClientRequest(
                "Invalid request line (HTTP/0.9 is not supported): %r" % raw_requestline[:100])
        result = super().read_request(raw_requestline)
        self._deadline.cancel()
        self._set_phase(BUSY)
        if self.content_length or self.headers.get("transfer-encoding") is not None:
            # We never read request bodies: answer, then close instead of
            # draining what may be an endless body.
            self.content_length = 0
            del self.headers["transfer-encoding"]
            self.close_connection = True
        return result

    def _handle_client_error(self, ex):
        if self.dropped:
            # The server shut the connection while the request came in.
            logs.event(log, logging.DEBUG, "http", "closed connection: %s", self.dropped,
                       client=_peer(self.client_address))
            return None
        if isinstance(ex, HeaderTimeout):
            return ("408", httpwire.REQUEST_TIMEOUT)
        # Anything else raised while parsing a request is still the client's
        # doing: a 400, never a traceback, and a log line (at most one of
        # each kind of error per interval, as a client can repeat them).
        too_large = isinstance(ex, httpwire.HeadersTooLarge)
        text = getattr(ex, "formatted_message", None) or str(ex) or ex.__class__.__name__
        self.server.log_throttled(logging.INFO, "Request rejected: %s" if too_large else
                                  "Invalid request: %s", text[:MAX_LOGGED_TEXT],
                                  client=_peer(self.client_address), kind=type(ex))
        if too_large:
            return ("431", httpwire.HEADERS_TOO_LARGE)
        return ("400", httpwire.BAD_REQUEST)


def _peer(address) -> str:
    if isinstance(address, tuple) and address:
        return "%s:%s" % (address[0], address[1]) if len(address) > 1 else str(address[0])
    return str(address or "-")


class Server(pywsgi.WSGIServer):
    """WSGIServer with the connection caps, TCP_NODELAY, a bounded receive
    buffer, send deadlines, slot reuse and EMFILE handling."""

    handler_class = Handler

    def __init__(self, listener, application, header_timeout: float, max_connections: int,
                 max_per_client: int, send_timeout: float, **kwargs):
        super().__init__(listener, application, **kwargs)
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.connections = 0
        self.per_client = {}        # client_key -> connections
        self.closing = False
        self.handlers = {}          # Handler -> None, oldest first
        self._throttles = collections.defaultdict(logs.Throttle)   # by (log text, kind)
        self._emfile_logged = False
        hub = gevent.get_hub()
        if AcceptPaused not in hub.NOT_ERROR:
            hub.NOT_ERROR = tuple(hub.NOT_ERROR) + (AcceptPaused,)

    def init_socket(self):
        super().init_socket()
        # Accepted sockets inherit them: what a client pipelines ahead of the
        # answers waits in its own buffers, not in ours, and a client that
        # does not read holds at most SEND_BUFFER of answers here.
        for option, size in ((socket.SO_RCVBUF, RECEIVE_BUFFER), (socket.SO_SNDBUF, SEND_BUFFER)):
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, option, size)
            except (OSError, AttributeError):
                pass

    def use_ssl_context(self, context) -> None:
        """Serve new connections with CONTEXT (new certificates); those open
        keep theirs.  gevent wraps each accepted socket with the server's
        ``wrap_socket`` as it accepts it."""
        self.wrap_socket = context.wrap_socket

    def at_capacity(self) -> bool:
        # (Not "full": gevent's BaseServer stops accepting while full() is true.)
        return self.connections >= self.max_connections

    def track(self, handler: Handler) -> None:
        handler.client_key = httpwire.client_key(handler.client_address)
        self.handlers[handler] = None

    def untrack(self, handler: Handler) -> None:
        self.handlers.pop(handler, None)

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
        key = httpwire.client_key(address)
        if self.per_client.get(key, 0) >= self.max_per_client:
            # One of its own makes room (none of anyone else's).
            if not self._make_room(key):
                self._refuse(sock, address, "refused connection: this client's %d connections"
                             " are busy with requests (--max-connections-per-client)",
                             self.max_per_client)
                return
        elif self.at_capacity() and not self._make_room():
            self._refuse(sock, address, "refused connection: all %d slots busy with requests",
                         self.max_connections)
            return
        self.connections += 1
        self.per_client[key] = self.per_client.get(key, 0) + 1
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            super().handle(sock, address)
        finally:
            self.connections -= 1
            self.per_client[key] -= 1
            if not self.per_client[key]:
                del self.per_client[key]

    def _make_room(self, key: Optional[str] = None) -> bool:
        """All slots (of client KEY, if given) are taken: drop the connection
        that has waited longest for its request, or that has been unable to
        send the longest (at least STALLED_AFTER).  False when every one is
        busy with a request."""
        now = time.monotonic()
        victim, oldest = None, -1.0
        for handler in self.handlers:
            age = now - handler.phase_since
            if handler.dropped or age <= oldest or getattr(handler, "socket", None) is None \
                    or key not in (None, handler.client_key):
                continue
            if handler.phase == IDLE and httpwire.has_input(handler.socket):
                continue        # its request has just begun
            if handler.phase in (IDLE, READING) or (handler.phase == SENDING
                                                    and age >= STALLED_AFTER):
                victim, oldest = handler, age
        if victim is None:
            return False
        victim.dropped = "%s for %.1f s, its slot was needed (%s)" % (
            _DOING[victim.phase], oldest, "--max-connections %d" % self.max_connections
            if key is None else "--max-connections-per-client %d" % self.max_per_client)
        if victim.phase == SENDING:
            httpwire.abort_on_close(victim.socket)
        httpwire.shutdown(victim.socket)
        return True

    def begin_shutdown(self) -> None:
        """Stop reusing connections: idle ones are closed now, busy ones after
        their current response (which says Connection: close)."""
        self.closing = True
        for handler in list(self.handlers):
            sock = getattr(handler, "socket", None)
            if handler.phase == IDLE and not handler.dropped and sock is not None \
                    and not httpwire.has_input(sock):
                handler.dropped = "the exporter is stopping"
                httpwire.shutdown(sock)

    def wait_handlers(self, timeout: float) -> bool:
        """Wait up to TIMEOUT for in-flight requests to finish."""
        deadline = time.monotonic() + timeout
        while self.handlers and time.monotonic() < deadline:
            gevent.sleep(SHUTDOWN_POLL)
        return not self.handlers

    def log_throttled(self, level: int, text: str, *args, client: str, kind=None) -> None:
        """An ``http`` event a client can cause at will: at most one line of
        each KIND (default: each TEXT) per logs.THROTTLE_INTERVAL."""
        self._throttles[text, kind].event(log, level, "http", text, *args, client=client)

    def _refuse(self, sock, address, text: str, *args) -> None:
        self.log_throttled(logging.WARNING, text, *args, client=_peer(address))
        try:
            sock.settimeout(1.0)
            sock.sendall(httpwire.TOO_MANY_CONNECTIONS)
        except OSError:
            pass
        finally:
            sock.close()
