"""WSGI routing: status codes, headers, the index page, service discovery.

The real work is ``App.respond()``, a plain method returning
``(status, headers, body)``; ``App.__call__`` is the thin WSGI shell.  It asks
the manager for sessions and sessions for outcomes; it never spawns anything.
The index page's rendering lives in ``indexpage``, the ``/targets`` document
in ``discovery``, the reading of scripts' costs in ``proccost``.

Owns routing, status codes, headers and the pages' text.  Must not fork or
signal processes, read script output itself (it asks sessions), or parse the
command line (``server.py`` hands it its settings).
"""

import gzip
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Tuple


from .. import __version__, logs
from ..logs import escape_line
from ..offhub import in_pool
from ..scripts import proccost
from ..scripts.catalog import valid_name
from ..scripts.session import Outcome, Session
from . import discovery, indexpage
from .basicauth import AUTH_BUSY, AUTH_OK, CHALLENGE

log = logging.getLogger("stap-exporter")

CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_TEXT = "text/plain; charset=utf-8"
CONTENT_TYPE_HTML = "text/html; charset=utf-8"

NOT_READY_PREFIX = "Refresh page to access metrics."

# Answer this much before a Prometheus scraper's own deadline.
SCRAPE_TIMEOUT_MARGIN = 0.25
MIN_SCRAPE_TIMEOUT = 0.1

Response = Tuple[str, List[Tuple[str, str]], bytes]

_STATUS = {
    200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized", 403: "403 Forbidden",
    404: "404 Not Found",
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
# Bodies this large are compressed in the hub's thread pool (up to 16 MiB
# takes a good part of a second: never on the hub).
GZIP_THREAD_MIN_BYTES = 64 * 1024


def compress(body: bytes) -> bytes:
    """BODY gzip-compressed, off the hub when it is large."""
    if len(body) < GZIP_THREAD_MIN_BYTES:
        return gzip.compress(body, GZIP_LEVEL)
    return in_pool(gzip.compress, body, GZIP_LEVEL)


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

    def __init__(self, manager, default_timeout: float, validate: bool,
                 clock: Callable[[], float] = time.monotonic, metrics=None, auth=None,
                 advertise: Optional[str] = None, proc: str = proccost.DEFAULT_PROC,
                 wall_clock: Callable[[], float] = time.time, bpf_stats: bool = False):
        self.manager = manager
        self.advertise = advertise  # HOST:PORT for /targets, overriding the Host header
        self.proc = proc
        self.wall_clock = wall_clock
        self.last_scrape: Dict[str, float] = {}  # script -> wall time of its last request
        self.default_timeout = default_timeout
        self.clock = clock
        self.metrics = metrics
        self.validate = validate
        self.auth = auth
        self.bpf_stats = bpf_stats  # the kernel's BPF statistics are on: probe time shown
        self._host_log = logs.Throttle()
        self._probe_looks: Dict[str, tuple] = {}  # script -> what probe_share remembers

    def __call__(self, environ, start_response):
        status, headers, body = self.respond(environ)
        if status[0] == "2":
            if ("Vary", "Accept-Encoding") not in headers:
                headers.append(("Vary", "Accept-Encoding"))
            if len(body) >= GZIP_MIN_BYTES and wants_gzip(environ):
                body = compress(body)
                headers.append(("Content-Encoding", "gzip"))
        if environ.get("REQUEST_METHOD") == "HEAD":
            # pywsgi sets Date, and Content-Length from what is sent: none here.
            headers.append(("Content-Length", str(len(body))))
            start_response(status, headers)
            return [b""]
        start_response(status, headers)
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
        path = _request_path(environ)
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
        self.last_scrape[session.name] = self.wall_clock()
        response, reason = self._scrape(session, environ)
        if self.metrics is not None:
            self.metrics.observe(session.name, self.clock() - started, reason)
            self.metrics.note_start(session)
        return response

    def _scrape(self, session: Session, environ):
        """(response, error reason or None)."""
        outcome = session.scrape(self._timeout(environ, session.settings.scrape_timeout))
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
        # The message may quote the script's stderr: keep a terminal safe.
        message = escape_line(outcome.message, keep_newlines=True)
        extra = []
        if outcome.retry_after is not None:
            extra.append(("Retry-After", "%d" % max(1, round(outcome.retry_after))))
        if outcome.kind == Outcome.NOT_READY:
            return text_response(503, "%s  %s" % (NOT_READY_PREFIX, message), extra)
        if outcome.kind == Outcome.FAILED:
            return text_response(502, message + "\nThe next request starts it again.")
        if outcome.kind == Outcome.UNTRUSTED:
            return text_response(502, "Untrusted script output: %s" % message)
        if outcome.kind == Outcome.FORBIDDEN:
            return text_response(403, "Untrusted script: %s" % message)
        if outcome.kind == Outcome.BAD_SETTINGS:
            return text_response(403, "Script refused: %s" % message)
        if outcome.kind == Outcome.BUSY:
            return text_response(503, "Too busy to start the script: %s" % message, extra)
        if outcome.kind == Outcome.SERIES_LIMIT:
            return text_response(502, "Too many series: %s" % message)
        return text_response(503, "Script output unavailable: %s" % message, extra)

    def _timeout(self, environ, own: Optional[float] = None) -> float:
        """The scrape's deadline: the script's own (OWN) or ours, shortened to
        end a little before the scraper's own (Prometheus sends
        X-Prometheus-Scrape-Timeout-Seconds)."""
        timeout = own or self.default_timeout
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

    # -- service discovery ------------------------------------------------

    def targets(self, environ) -> Response:
        """Prometheus http_sd: one target group per script this exporter would
        serve now.  Starts nothing."""
        address = self.advertise
        if address is None:
            address, refused = discovery.request_address(environ)
            if refused is not None:
                self._host_log.event(log, logging.INFO, "targets", "refused Host header %s"
                                     " from %s; advertising the local address %s instead"
                                     " (see --advertise-address)", refused[:MAX_LOGGED_HOST],
                                     environ.get("REMOTE_ADDR", "-"), address)
            if address is None:
                return text_response(503, "Cannot tell which address to advertise: the"
                                     " request has no usable Host header; see"
                                     " --advertise-address.")
        scheme = environ.get("wsgi.url_scheme", "http")
        groups = discovery.target_groups(self._servable_names(), address, scheme)
        return "200 OK", [("Content-Type", discovery.CONTENT_TYPE_JSON)], discovery.render(groups)

    def _servable_names(self) -> List[str]:
        """The scripts a request could be served from now, as the directory
        lists them (a script added since the last scan included, one removed
        excluded).  Names that are not UTF-8 cannot appear in a scrape URL."""
        catalog = self.manager.catalog
        try:
            listing = in_pool(os.listdir, catalog.directory)
        except OSError:
            return catalog.names()
        names = []
        for name in sorted(listing):
            if not valid_name(name) or not _is_utf8(name):
                continue
            if catalog.lookup(name) is not None:  # rescans only for a new file
                names.append(name)
        return names

    # -- index page -------------------------------------------------------

    def index(self, environ) -> Response:
        sessions = self.manager.all()
        costs = proccost.measure({s.pid: s.script.module for s in sessions if s.pid}, self.proc)
        now = self.wall_clock()
        looks, self._probe_looks = self._probe_looks, {}
        rows = [self._row(s, costs.get(s.pid) if s.pid else None, now, looks) for s in sessions]
        page = indexpage.Page(__version__, self.manager.catalog.directory,
                              self.manager.catalog.last_error, rows)
        if "text/html" in environ.get("HTTP_ACCEPT", ""):
            return "200 OK", [("Content-Type", CONTENT_TYPE_HTML)], indexpage.render_html(page)
        return "200 OK", [("Content-Type", CONTENT_TYPE_TEXT)], indexpage.render_text(page)

    def _row(self, s: Session, cost: Optional[proccost.Cost], now: float,
             looks: Dict[str, tuple]) -> indexpage.ScriptRow:
        scraped = self.last_scrape.get(s.name)
        kernel = cost.kernel if cost else None
        share = None
        if self.bpf_stats and kernel is not None and kernel.bpf:
            share, self._probe_looks[s.name] = probe_share(
                looks.get(s.name), s.pid, s.started_at, self.clock(), kernel.probe_seconds)
        return indexpage.ScriptRow(
            name=s.name, state=s.state, pid=s.pid, uptime=s.uptime(), starts=s.starts,
            scraped_ago=None if scraped is None else now - scraped,
            output_bytes=s.last_output_bytes, output_read=s.output_read,
            cpu_seconds=cost.cpu_seconds if cost else None,
            resident_bytes=cost.resident_bytes if cost else None,
            last_error=s.last_error, stderr_tail=list(s.stderr_tail), retry_in=s.retry_in(),
            queued=s.queued, settings=s.settings_text(self.default_timeout),
            edit_error=s.edit_error, edit_stderr=s.edit_stderr, probe_share=share,
            kernel_bytes=kernel.memory_bytes if kernel else None,
            series=s.last_series if s.last_output_bytes else None)


# The index's probe time is the growth over at least this many seconds.
PROBE_WINDOW = 10.0


def probe_share(looks, pid: int, started_at: Optional[float], now: float, seconds: float):
    """(probe time as a share of a CPU, what to remember for the next look):
    the growth of SECONDS since a look at least PROBE_WINDOW ago, or since
    the run began (STARTED_AT) while no such look exists.  LOOKS is what the
    last look of the same script remembered, or None."""
    if looks is None or looks[0] != pid:
        since = started_at if started_at is not None else now
        looks = (pid, (since, 0.0), (since, 0.0))
    _pid, base, anchor = looks
    if now - anchor[0] >= PROBE_WINDOW:
        base, anchor = anchor, (now, seconds)
    elapsed = now - base[0]
    return ((seconds - base[1]) / elapsed if elapsed > 0 else None), (pid, base, anchor)


ROUTES = {"/metrics": "self_metrics", "/-/healthy": "healthy", "/-/ready": "ready",
          "/targets": "targets"}

# A refused Host header is logged, cut to this many characters.
MAX_LOGGED_HOST = 100


def _request_path(environ) -> str:
    """PATH_INFO as the file system names it.  WSGI hands over the path's
    bytes as Latin-1 (PEP 3333); file names are UTF-8 (undecodable bytes kept
    as surrogates, as ``os.listdir`` gives them), so ``/%C3%BC.stp`` reaches
    the script listed as ``\u00fc.stp``."""
    path = environ.get("PATH_INFO", "/")
    try:
        return path.encode("latin-1").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # not from a WSGI server: already text
        return path


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the file system
        return False
    return True


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
