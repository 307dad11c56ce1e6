"""WSGI routing: status codes, headers, the index page.

The real work is ``App.respond()``, a plain method returning
``(status, headers, body)``; ``App.__call__`` is the thin WSGI shell.  It asks
the manager for sessions and sessions for outcomes; it never spawns anything.
"""

import gzip
import html
import time
from email.utils import formatdate
from typing import Callable, List, Optional, Tuple
from urllib.parse import quote

import gevent.threadpool

from . import __version__
from .catalog import valid_name
from .logs import escape_line
from .session import Outcome, Session
from .webconfig import AUTH_BUSY, AUTH_OK, CHALLENGE

CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_TEXT = "text/plain; charset=utf-8"
CONTENT_TYPE_HTML = "text/html; charset=utf-8"

NOT_READY_PREFIX = "Refresh page to access metrics."

# How long a scrape may wait for output when the client sets no deadline.
DEFAULT_SCRAPE_TIMEOUT = 5.0
# Answer this much before a Prometheus scraper's own deadline.
SCRAPE_TIMEOUT_MARGIN = 0.25
MIN_SCRAPE_TIMEOUT = 0.1

Response = Tuple[str, List[Tuple[str, str]], bytes]

_STATUS = {
    200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized", 404: "404 Not Found",
    405: "405 Method Not Allowed", 502: "502 Bad Gateway",
    503: "503 Service Unavailable",
}


def text_response(code: int, text: str, extra: Optional[List[Tuple[str, str]]] = None) -> Response:
    body = text.encode("utf-8", "replace")
    if not body.endswith(b"\n"):
        body += b"\n"
    headers = [("Content-Type", CONTENT_TYPE_TEXT)] + (extra or [])
    return _STATUS[code], headers, body


# Bodies smaller than this are sent as they are even to gzip-capable clients.
GZIP_MIN_BYTES = 1024
GZIP_LEVEL = 6
# Bodies this large are compressed in a thread (up to 16 MiB takes a good part
# of a second: never on the hub), by GZIP_THREADS threads of their own so
# they cannot hold up output reads in the hub's pool.
GZIP_THREAD_MIN_BYTES = 64 * 1024
GZIP_THREADS = 2
_gzip_pool = []


def compress(body: bytes) -> bytes:
    """BODY gzip-compressed, off the hub when it is large."""
    if len(body) < GZIP_THREAD_MIN_BYTES:
        return gzip.compress(body, GZIP_LEVEL)
    if not _gzip_pool:
        _gzip_pool.append(gevent.threadpool.ThreadPool(GZIP_THREADS))
    return _gzip_pool[0].apply(gzip.compress, (body, GZIP_LEVEL))


def wants_gzip(environ) -> bool:
    """True if the client's Accept-Encoding allows gzip (q > 0)."""
    for item in environ.get("HTTP_ACCEPT_ENCODING", "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip()
            return not (q.startswith("q=") and _float(q[2:]) == 0)
    return False


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


class App:
    """The exporter's HTTP interface."""

    def __init__(self, manager, default_timeout: float = DEFAULT_SCRAPE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic, metrics=None,
                 validate: bool = False, auth=None):
        self.manager = manager
        self.default_timeout = default_timeout
        self.clock = clock
        self.metrics = metrics
        self.validate = validate
        self.auth = auth

    def __call__(self, environ, start_response):
        status, headers, body = self.respond(environ)
        if status[0] == "2":
            if ("Vary", "Accept-Encoding") not in headers:
                headers.append(("Vary", "Accept-Encoding"))
            if len(body) >= GZIP_MIN_BYTES and wants_gzip(environ):
                body = compress(body)
                headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        headers.append(("Date", _http_date()))
        start_response(status, headers)
        if environ.get("REQUEST_METHOD") == "HEAD":
            return [b""]
        return [body]

    def respond(self, environ) -> Response:
        if self.auth is not None:
            verdict = self.auth.verify(environ)
            if verdict == AUTH_BUSY:
                # Closing makes a flooding client pay for a new connection
                # instead of spinning on this one.
                return text_response(503, "Too many authentication checks under way; try"
                                     " again later.", [("Retry-After", "1"),
                                                       ("Connection", "close")])
            if verdict != AUTH_OK:
                return text_response(401, "Authentication required.", [CHALLENGE])
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return text_response(405, "Method %s is not allowed; use GET or HEAD."
                                 % escape_line(method)[:32], [("Allow", "GET, HEAD")])
        path = environ.get("PATH_INFO", "/")
        if path == "/":
            return self.index(environ)
        if path in ROUTES:
            return getattr(self, ROUTES[path])(environ)
        name = path[1:]
        if not valid_name(name):
            return text_response(404, "Not found. Scripts are served as /NAME.stp; see / for"
                                 " the list.")
        session = self.manager.get(name)
        if session is None:
            return text_response(404, "No script named %s in the scripts directory."
                                 % escape_line(name)[:300])
        return self.scrape(session, environ)

    def scrape(self, session: Session, environ) -> Response:
        started = self.clock()
        response, reason = self._scrape(session, environ)
        if self.metrics is not None:
            self.metrics.observe(session.name, self.clock() - started, reason)
        return response

    def _scrape(self, session: Session, environ):
        """(response, error reason or None)."""
        outcome = session.scrape(self._timeout(environ))
        if outcome.kind == Outcome.OK:
            if self.validate:
                problem = validation_error(outcome.body)
                if problem:
                    return text_response(502, "The script's output is not valid Prometheus"
                                         " text: %s" % problem), "invalid"
            return ("200 OK", [("Content-Type", CONTENT_TYPE_METRICS),
                               ("Vary", "Accept-Encoding")], outcome.body), None
        return self._failure(outcome), outcome.kind

    def _failure(self, outcome: Outcome) -> Response:
        extra = []
        if outcome.retry_after is not None:
            extra.append(("Retry-After", "%d" % max(1, round(outcome.retry_after))))
        if outcome.kind == Outcome.NOT_READY:
            return text_response(503, "%s  %s" % (NOT_READY_PREFIX, outcome.message), extra)
        if outcome.kind == Outcome.FAILED:
            return text_response(502, outcome.message + "\nThe next request starts it again.")
        if outcome.kind == Outcome.BUSY:
            return text_response(503, "Too busy to start the script: %s" % outcome.message, extra)
        return text_response(503, "Script output unavailable: %s" % outcome.message, extra)

    def _timeout(self, environ) -> float:
        """The scrape's deadline: ours, shortened to end a little before the
        scraper's own (Prometheus sends X-Prometheus-Scrape-Timeout-Seconds)."""
        timeout = self.default_timeout
        raw = environ.get("HTTP_X_PROMETHEUS_SCRAPE_TIMEOUT_SECONDS")
        if raw:
            try:
                theirs = float(raw)
            except ValueError:
                theirs = None
            if theirs is not None and theirs > 0:
                timeout = min(timeout, theirs - SCRAPE_TIMEOUT_MARGIN)
        return max(MIN_SCRAPE_TIMEOUT, timeout)

    # -- the exporter's own endpoints -------------------------------------

    def self_metrics(self, environ) -> Response:
        if self.metrics is None:
            return text_response(404, "Self-metrics are disabled.")
        return "200 OK", [("Content-Type", CONTENT_TYPE_METRICS),
                          ("Vary", "Accept-Encoding")], self.metrics.render()

    def healthy(self, environ) -> Response:
        return text_response(200, "stap-exporter is healthy.")

    def ready(self, environ) -> Response:
        if self.manager.shutting_down:
            return text_response(503, "stap-exporter is shutting down.")
        error = self.manager.catalog.check_directory()
        if error:
            return text_response(503, "Not ready: %s" % error)
        return text_response(200, "stap-exporter is ready.")

    # -- index page -------------------------------------------------------

    def index(self, environ) -> Response:
        rows = []
        tails = []
        for s in self.manager.all():
            if s.last_error and s.stderr_tail:
                tails.append((s.name, list(s.stderr_tail)))
            uptime = s.uptime()
            rows.append((s.name, s.state, str(s.pid) if s.pid else "-",
                         "%.0fs" % uptime if uptime is not None else "-",
                         str(s.starts), s.last_error or "-"))
        error = self.manager.catalog.last_error
        if "text/html" in environ.get("HTTP_ACCEPT", ""):
            return ("200 OK", [("Content-Type", CONTENT_TYPE_HTML)],
                    self._html(rows, error, tails))
        return "200 OK", [("Content-Type", CONTENT_TYPE_TEXT)], self._text(rows, error, tails)

    def _text(self, rows, error, tails) -> bytes:
        lines = ["stap-exporter %s: %d scripts in %s" % (
            __version__, len(rows), self.manager.catalog.directory)]
        if error:
            lines.append("error: " + error)
        header = ("SCRIPT", "STATE", "PID", "UPTIME", "STARTS", "LAST ERROR")
        table = [header] + rows
        widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
        for r in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        for name, tail in tails:
            lines.append("")
            lines.append("%s: last lines of standard error:" % name)
            lines.extend("  " + line for line in tail)
        return ("\n".join(lines) + "\n").encode("utf-8", "replace")

    def _html(self, rows, error, tails) -> bytes:
        e = html.escape
        out = ["<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
               "<title>stap-exporter</title></head><body>",
               "<h1>stap-exporter %s</h1>" % e(__version__),
               "<p>%d scripts in <code>%s</code></p>" % (len(rows),
                                                        e(self.manager.catalog.directory))]
        if error:
            out.append("<p><strong>error:</strong> %s</p>" % e(error))
        out.append("<table border=\"1\"><tr><th>script</th><th>state</th><th>pid</th>"
                   "<th>uptime</th><th>starts</th><th>last error</th></tr>")
        for name, state, pid, uptime, starts, err in rows:
            out.append("<tr><td><a href=\"%s\">%s</a></td><td>%s</td><td>%s</td><td>%s</td>"
                       "<td>%s</td><td>%s</td></tr>" % (
                           e(_quote(name)), e(name), e(state), pid, uptime, starts, e(err)))
        out.append("</table>")
        for name, tail in tails:
            out.append("<h2>%s: last lines of standard error</h2><pre>%s</pre>"
                       % (e(name), e("\n".join(tail))))
        out.append("</body></html>\n")
        return "\n".join(out).encode("utf-8", "replace")


_date_cache = [0, ""]


def _http_date() -> str:
    """The Date header, formatted once a second rather than per request."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return _date_cache[1]


ROUTES = {"/metrics": "self_metrics", "/-/healthy": "healthy", "/-/ready": "ready"}


def validation_error(body: bytes) -> Optional[str]:
    """None if BODY parses as Prometheus text, else the parser's complaint."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = body.decode("utf-8")
        for _ in text_string_to_metric_families(text):
            pass
    except UnicodeDecodeError as exc:
        return "not UTF-8 (%s)" % exc.reason
    except Exception as exc:  # the parser raises ValueError and others
        return escape_line(str(exc))[:300] or exc.__class__.__name__
    return None


def _quote(name: str) -> str:
    return quote(name, safe="")
