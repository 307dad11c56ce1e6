"""The Prometheus exporter-toolkit web configuration file: TLS and basic auth.

The format is the one ``--web.config.file`` takes in the Go exporters
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md)::

    tls_server_config:
      cert_file: server.crt          # required with tls_server_config
      key_file: server.key           # required with tls_server_config
      client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
      client_ca_file: clients-ca.crt # required by the Verify* types
      min_version: TLS12             # default TLS12
      max_version: TLS13             # default TLS13
    basic_auth_users:
      alice: $2y$10$...              # bcrypt hashes

Relative paths are relative to the directory of the configuration file.
Unknown keys are errors, as in the toolkit; keys the toolkit knows but this
implementation does not (inline ``cert``/``key``, ``cipher_suites``,
``client_allowed_sans``, ``rate_limit``...) are errors too, rather than being
silently ignored.  ``http_server_config`` is accepted and ignored, with a note.

Differences from the toolkit, forced by Python's ``ssl`` module, which cannot
ask for a client certificate without verifying it: ``RequestClientCert`` is
served as ``NoClientCert`` (the certificate is never used either way), and
``RequireAnyClientCert`` is refused.  The file is read once, by ``load()``;
the toolkit rereads it on every request.
"""

import base64
import binascii
import collections
import hashlib
import hmac
import logging
import os
import re
import ssl
import time
from typing import Dict, List, Optional, Tuple

import bcrypt
import gevent
import gevent.ssl
import gevent.threadpool
import yaml

from . import logs
from .logs import escape_line

log = logging.getLogger("stap-exporter")

CHALLENGE = ("WWW-Authenticate", 'Basic realm="stap-exporter", charset="UTF-8"')

# Successful checks remembered by BasicAuth: how many, and for how long.
AUTH_CACHE_SIZE = 1024
AUTH_CACHE_TTL = 60.0
# bcrypt threads (separate from the hub's pool, which reads output), and how
# many checks may run or wait at once before requests get 503.
AUTH_THREADS = 2
AUTH_QUEUE = 16
# verify()'s answers.
AUTH_OK, AUTH_DENIED, AUTH_BUSY = "ok", "denied", "busy"
# How fast the measured duration of a highest-cost check follows changes.
FAILURE_TIME_WEIGHT = 0.2
MAX_LOGGED_USER = 100

# bcrypt only ever looks at the first 72 bytes of a password (Go's bcrypt, the
# toolkit's, ignores the rest; Python's bcrypt >= 5 raises instead).
BCRYPT_MAX_PASSWORD = 72

_BCRYPT_RE = re.compile(r"\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")

_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file",
             "min_version", "max_version")
# Known to the toolkit, not supported here: refused rather than ignored, since
# most of them restrict who may connect.
_UNSUPPORTED = {
    "rate_limit": "rate_limit",
    "cert": "inline cert (use cert_file)",
    "key": "inline key (use key_file)",
    "client_ca": "inline client_ca (use client_ca_file)",
    "client_allowed_sans": "client_allowed_sans",
    "cipher_suites": "cipher_suites",
    "curve_preferences": "curve_preferences",
    "prefer_server_cipher_suites": "prefer_server_cipher_suites",
}

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# client_auth_type -> (verify mode, needs client_ca_file); None: refused.
_CLIENT_AUTH = {
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_NONE, False),
    "RequireAnyClientCert": None,
    "RequireClientCert": None,          # the toolkit's old name for it
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}


class WebConfigError(Exception):
    """The web configuration file is unusable; the message is one line that
    names the file and the problem."""

    def __init__(self, message: str):
        super().__init__(escape_line(message))


class WebConfig:
    """A loaded web configuration.

    ``ssl_context``: a server-side ``ssl.SSLContext`` (gevent's subclass), or
    None when the file configures no TLS.  ``users``: user name -> bcrypt hash
    (bytes); empty means no authentication.  ``notes``: one-line remarks about
    accepted-but-ignored settings, for the log.
    """

    def __init__(self, path: str, ssl_context: Optional[ssl.SSLContext] = None,
                 users: Optional[Dict[str, bytes]] = None,
                 notes: Optional[List[str]] = None):
        self.path = path
        self.ssl_context = ssl_context
        self.users = dict(users or {})
        self.notes = list(notes or [])

    @property
    def auth_required(self) -> bool:
        """True when requests must carry valid basic-auth credentials."""
        return bool(self.users)

    def __repr__(self) -> str:
        return "WebConfig(%r, tls=%s, users=%s)" % (
            self.path, self.ssl_context is not None, sorted(self.users))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (as the toolkit's
    strict YAML decoding does): a repeated user must not silently win."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue    # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, "duplicate key %r" % (key,), key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load(path: str) -> WebConfig:
    """Read and check the web configuration file PATH, loading its
    certificates.  Returns a WebConfig; raises WebConfigError."""

    def fail(problem: str) -> WebConfigError:
        return WebConfigError("web config %s: %s" % (path, problem))

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise fail("cannot read it: %s" % (e.strerror or e)) from None
    try:
        doc = yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise fail(_yaml_problem(e)) from None

    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise fail("expected a mapping of settings at the top level, got %s" % _kind(doc))
    for key in doc:
        if key in _UNSUPPORTED:
            raise fail("%s is not supported by stap-exporter" % _UNSUPPORTED[key])
        if key not in _TOP_KEYS:
            raise fail("unknown key %r (expected one of: %s)" % (key, ", ".join(_TOP_KEYS)))

    notes = []
    if doc.get("http_server_config") is not None:
        notes.append("web config %s: http_server_config is ignored by stap-exporter" % path)
    base = os.path.dirname(os.path.abspath(path))
    context = None
    if "tls_server_config" in doc:
        context = _ssl_context(doc["tls_server_config"], base, fail, notes, path)
    users = _users(doc.get("basic_auth_users"), fail)
    return WebConfig(path, context, users, notes)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None)
    if isinstance(e, yaml.reader.ReaderError):
        return "not valid UTF-8 text (byte offset %d)" % e.position
    where = "line %d column %d: " % (mark.line + 1, mark.column + 1) if mark else ""
    context = getattr(e, "context", None)
    text = " ".join(str(p) for p in (context, problem) if p) or str(e)
    return "YAML syntax error at %s%s" % (where, " ".join(text.split()))


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), "a %s" % type(value).__name__)


def _ssl_context(tls, base: str, fail, notes: List[str], path: str) -> ssl.SSLContext:
    """Build the server-side SSLContext from the tls_server_config mapping."""
    if tls is None:
        raise fail("tls_server_config is empty: it needs cert_file and key_file")
    if not isinstance(tls, dict):
        raise fail("tls_server_config must be a mapping, got %s" % _kind(tls))
    for key in tls:
        if key in _UNSUPPORTED:
            raise fail("tls_server_config: %s is not supported by stap-exporter"
                       % _UNSUPPORTED[key])
        if key not in _TLS_KEYS:
            raise fail("tls_server_config: unknown key %r (expected one of: %s)"
                       % (key, ", ".join(_TLS_KEYS)))

    def string(key: str) -> Optional[str]:
        value = tls.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise fail("tls_server_config: %s must be a string, got %s" % (key, _kind(value)))
        return value

    def filename(key: str) -> Optional[str]:
        value = string(key)
        return None if value is None else os.path.join(base, value)

    cert_file, key_file = filename("cert_file"), filename("key_file")
    if cert_file is None:
        raise fail("tls_server_config: missing cert_file")
    if key_file is None:
        raise fail("tls_server_config: missing key_file")

    auth_type = string("client_auth_type") or "NoClientCert"
    if auth_type not in _CLIENT_AUTH:
        raise fail("tls_server_config: invalid client_auth_type %r (expected one of: %s)"
                   % (auth_type, ", ".join(k for k in _CLIENT_AUTH if k != "RequireClientCert")))
    if _CLIENT_AUTH[auth_type] is None:
        raise fail("tls_server_config: client_auth_type %s is not supported by stap-exporter"
                   " (Python's ssl cannot require a client certificate without verifying it);"
                   " use RequireAndVerifyClientCert with client_ca_file" % auth_type)
    verify_mode, needs_ca = _CLIENT_AUTH[auth_type]
    ca_file = filename("client_ca_file")
    if needs_ca and ca_file is None:
        raise fail("tls_server_config: client_auth_type %s needs client_ca_file" % auth_type)
    if ca_file is not None and not needs_ca:
        # The toolkit's own rule: a CA that would never be used is a mistake.
        raise fail("tls_server_config: client_ca_file is set but client_auth_type %s does not"
                   " verify client certificates (use RequireAndVerifyClientCert)" % auth_type)
    if auth_type == "RequestClientCert":
        notes.append("web config %s: client_auth_type RequestClientCert: client certificates"
                     " are neither requested nor used (same as NoClientCert)" % path)

    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = string(key) or default
        if name not in _TLS_VERSIONS:
            raise fail("tls_server_config: invalid %s %r (expected one of: %s)"
                       % (key, name, ", ".join(_TLS_VERSIONS)))
        versions[key] = _TLS_VERSIONS[name]
    if versions["min_version"] > versions["max_version"]:
        raise fail("tls_server_config: min_version is above max_version")

    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = versions["min_version"]
        context.maximum_version = versions["max_version"]
    except (ValueError, ssl.SSLError) as e:
        raise fail("tls_server_config: cannot set the TLS versions: %s" % e) from None

    _check_certificates(cert_file, "cert_file", fail)
    _check_readable(key_file, "key_file", fail)

    def no_password():
        raise fail("tls_server_config: key_file %s is encrypted; stap-exporter needs an"
                   " unencrypted key" % key_file)

    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except WebConfigError:
        raise
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or e.reason == "KEY_VALUES_MISMATCH":
            raise fail("tls_server_config: key_file %s does not match cert_file %s"
                       % (key_file, cert_file)) from None
        raise fail("tls_server_config: cannot load key_file %s: %s"
                   % (key_file, _ssl_reason(e))) from None
    except OSError as e:
        raise fail("tls_server_config: cannot load cert_file %s / key_file %s: %s"
                   % (cert_file, key_file, e.strerror or e)) from None

    context.verify_mode = verify_mode
    if ca_file is not None:
        _check_certificates(ca_file, "client_ca_file", fail)
        context.load_verify_locations(cafile=ca_file)
    return context


def _check_readable(filename: str, key: str, fail) -> bytes:
    try:
        with open(filename, "rb") as f:
            return f.read()
    except OSError as e:
        raise fail("tls_server_config: cannot read %s %s: %s"
                   % (key, filename, e.strerror or e)) from None


def _check_certificates(filename: str, key: str, fail) -> None:
    """Raise unless FILENAME is readable and holds PEM certificates."""
    data = _check_readable(filename, key, fail)
    try:
        text = data.decode("ascii")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError("no PEM certificate in it")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ValueError, ssl.SSLError) as e:
        reason = _ssl_reason(e) if isinstance(e, ssl.SSLError) else str(e)
        if isinstance(e, UnicodeDecodeError):
            reason = "not PEM text"
        raise fail("tls_server_config: %s %s is not a usable certificate file: %s"
                   % (key, filename, reason)) from None


def _ssl_reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return "%s (%s)" % (e.reason, e.library) if e.library else str(e.reason)
    return str(e)


def _users(users, fail) -> Dict[str, bytes]:
    """Check basic_auth_users: user name -> bcrypt hash."""
    if users is None:
        return {}
    if not isinstance(users, dict):
        raise fail("basic_auth_users must be a mapping of user name to bcrypt hash, got %s"
                   % _kind(users))
    result = {}
    for user, hashed in users.items():
        if not isinstance(user, str) or not user:
            raise fail("basic_auth_users: user name %r must be a non-empty string (quote it)"
                       % (user,))
        if ":" in user:
            raise fail("basic_auth_users: user name %r contains ':', which basic auth"
                       " cannot carry" % user)
        if not isinstance(hashed, str) or not _BCRYPT_RE.match(hashed):
            raise fail("basic_auth_users: the password of %r is not a bcrypt hash"
                       " (expected $2y$<cost>$... as made by htpasswd -nBC 10)" % user)
        result[user] = hashed.encode("ascii")
    return result


def wrap_socket_args(webconfig: Optional[WebConfig]) -> dict:
    """Keyword arguments for ``gevent.pywsgi.WSGIServer(...)`` that make it
    serve TLS per WEBCONFIG, or {} without TLS.

    gevent wraps each accepted socket with ``ssl_context.wrap_socket(sock,
    server_side=True, do_handshake_on_connect=False)``.  The handshake is
    deferred on purpose: it then happens on the handler's first read of the
    request line, inside the handler's own deadline and connection count, and
    a failed handshake (plain HTTP, untrusted or missing client certificate)
    is a socket error on that read, which pywsgi drops quietly.  Done on
    connect, it would run before the handler with no timeout, and gevent would
    print a traceback for every failure."""
    if webconfig is None or webconfig.ssl_context is None:
        return {}
    return {"ssl_context": webconfig.ssl_context, "do_handshake_on_connect": False}


class BasicAuth:
    """HTTP basic authentication against bcrypt hashes.

    bcrypt is slow by design, so it runs in a small thread pool of its own
    (AUTH_THREADS), never on the hub and never in the pool that reads
    scripts' output, so failed logins cannot starve scrapes.  At most
    AUTH_QUEUE checks run or wait at once; beyond that ``verify`` answers
    BUSY at once (the app sends 503).  Successful checks are remembered for
    AUTH_CACHE_TTL seconds (bounded LRU keyed by an HMAC of user and
    password under a per-process key), so a scraper's repeated requests
    cost one bcrypt; failures are never remembered.

    A failure takes as long as a check at the highest configured cost,
    whichever user was named (known at a lower cost, known, or unknown):
    the name cannot be probed by timing.
    """

    def __init__(self, users: Dict[str, bytes], cache_size: int = AUTH_CACHE_SIZE,
                 threads: int = AUTH_THREADS, queue: int = AUTH_QUEUE,
                 cache_ttl: float = AUTH_CACHE_TTL, clock=time.monotonic):
        self.users = [(name.encode("utf-8"), hashed) for name, hashed in users.items()]
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.queue = queue
        self.clock = clock
        self._threads = threads
        self._pool = None
        self._pending = 0
        self._cache = collections.OrderedDict()  # type: collections.OrderedDict
        self._key = os.urandom(32)
        self._max_cost = max((_cost(h) for _, h in self.users), default=4)
        # Unknown users are checked against a hash of the highest cost.
        self._dummy = b"$2b$%02d$" % self._max_cost + b"." * 53
        self._failure_time = None   # seconds a check at the highest cost takes
        self._busy_log = logs.Throttle()
        self._denied_log = logs.Throttle()

    @staticmethod
    def credentials(environ) -> Optional[Tuple[bytes, bytes]]:
        """(user, password) bytes from the request's Authorization header,
        or None when it is missing or malformed."""
        header = environ.get("HTTP_AUTHORIZATION")
        if not isinstance(header, str):
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip().encode("ascii"), validate=True)
        except (ValueError, binascii.Error, UnicodeEncodeError):
            return None
        user, colon, password = decoded.partition(b":")
        if not colon:
            return None
        try:
            user.decode("utf-8")
            password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return user, password

    def check(self, environ) -> bool:
        """True if the request carries the right user name and password."""
        return self.verify(environ) == AUTH_OK

    def verify(self, environ) -> str:
        """AUTH_OK, AUTH_DENIED, or AUTH_BUSY when too many checks are
        already under way.  Blocks only the calling greenlet."""
        creds = self.credentials(environ)
        if creds is None:
            return AUTH_DENIED
        user, password = creds
        hashed = None
        for name, candidate in self.users:
            if hmac.compare_digest(name, user):
                hashed = candidate
        key = hmac.new(self._key, user + b":" + password, hashlib.sha256).digest()
        if hashed is not None and self._cached(key):
            return AUTH_OK
        if self._pending >= self.queue:
            self._log_refusal(self._busy_log, "refused: %d authentication checks under way;"
                              " answered 503", environ, user, self._pending)
            return AUTH_BUSY
        target = hashed or self._dummy
        ok, took = self._run(password[:BCRYPT_MAX_PASSWORD], target)
        if _cost(target) == self._max_cost:
            self._learn(took)
        if ok and hashed is not None:
            self._remember(key)
            return AUTH_OK
        self._pad_failure(took)
        self._log_refusal(self._denied_log, "denied: wrong user name or password",
                          environ, user)
        return AUTH_DENIED

    def _run(self, password: bytes, hashed: bytes) -> Tuple[bool, float]:
        if self._pool is None:
            self._pool = gevent.threadpool.ThreadPool(self._threads)
        self._pending += 1
        try:
            return self._pool.apply(_timed_checkpw, (password, hashed))
        finally:
            self._pending -= 1

    def _learn(self, took: float) -> None:
        old = self._failure_time
        self._failure_time = took if old is None else old + FAILURE_TIME_WEIGHT * (took - old)

    def _pad_failure(self, took: float) -> None:
        """Make this failure last as long as a check at the highest cost."""
        if self._failure_time is None:
            # Nothing measured at the highest cost yet: measure it now.
            _, measured = self._run(b"", self._dummy)
            self._learn(measured)
        remaining = self._failure_time - took
        if remaining > 0:
            gevent.sleep(remaining)

    def _cached(self, key: bytes) -> bool:
        expires = self._cache.get(key)
        if expires is None:
            return False
        if expires <= self.clock():
            del self._cache[key]
            return False
        self._cache.move_to_end(key)
        return True

    def _remember(self, key: bytes) -> None:
        self._cache[key] = self.clock() + self.cache_ttl
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @staticmethod
    def _log_refusal(throttle, text: str, environ, user: bytes, *args) -> None:
        skipped = throttle.allow()
        if skipped is not None:
            logs.event(log, logging.WARNING, "auth", text + "%s", *args,
                       " (and %d more not logged)" % skipped if skipped else "",
                       client="%s:%s" % (environ.get("REMOTE_ADDR", "-"),
                                         environ.get("REMOTE_PORT", "-")),
                       user=user.decode("utf-8", "replace")[:MAX_LOGGED_USER])


def _cost(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


def _timed_checkpw(password: bytes, hashed: bytes) -> Tuple[bool, float]:
    """(checkpw's answer, seconds it took), measured in the worker thread."""
    started = time.perf_counter()
    ok = _checkpw(password, hashed)
    return ok, time.perf_counter() - started


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False
