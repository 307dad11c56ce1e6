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
``RequireAnyClientCert`` is refused.  The file is read by ``load()`` at
start-up and on SIGHUP (``server.py``); the toolkit rereads it on every
request.

Owns the web configuration file.  Must not touch
sessions or sockets (``http.py`` wraps the listener with its TLS context).
"""

import logging
import os
import re
import ssl
from typing import Dict, List, Optional

import gevent.ssl
import yaml

from ..logs import escape_line

log = logging.getLogger("stap-exporter")

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
    cert_file = _tls_filename(tls, "cert_file", base, fail)
    key_file = _tls_filename(tls, "key_file", base, fail)
    if cert_file is None:
        raise fail("tls_server_config: missing cert_file")
    if key_file is None:
        raise fail("tls_server_config: missing key_file")
    verify_mode, ca_file = _client_auth(tls, base, fail, notes, path)
    context = _context_with_versions(tls, fail)
    _check_certificates(cert_file, "cert_file", fail)
    _check_readable(key_file, "key_file", fail)
    _load_key_pair(context, cert_file, key_file, fail)
    context.verify_mode = verify_mode
    if ca_file is not None:
        _check_certificates(ca_file, "client_ca_file", fail)
        context.load_verify_locations(cafile=ca_file)
    return context


def _tls_string(tls: dict, key: str, fail) -> Optional[str]:
    value = tls.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise fail("tls_server_config: %s must be a string, got %s" % (key, _kind(value)))
    return value


def _tls_filename(tls: dict, key: str, base: str, fail) -> Optional[str]:
    value = _tls_string(tls, key, fail)
    return None if value is None else os.path.join(base, value)


def _client_auth(tls: dict, base: str, fail, notes: List[str], path: str):
    """(verify_mode, client CA file or None) from client_auth_type and
    client_ca_file."""
    auth_type = _tls_string(tls, "client_auth_type", fail) or "NoClientCert"
    if auth_type not in _CLIENT_AUTH:
        raise fail("tls_server_config: invalid client_auth_type %r (expected one of: %s)"
                   % (auth_type, ", ".join(k for k in _CLIENT_AUTH if k != "RequireClientCert")))
    if _CLIENT_AUTH[auth_type] is None:
        raise fail("tls_server_config: client_auth_type %s is not supported by stap-exporter"
                   " (Python's ssl cannot require a client certificate without verifying it);"
                   " use RequireAndVerifyClientCert with client_ca_file" % auth_type)
    verify_mode, needs_ca = _CLIENT_AUTH[auth_type]
    ca_file = _tls_filename(tls, "client_ca_file", base, fail)
    if needs_ca and ca_file is None:
        raise fail("tls_server_config: client_auth_type %s needs client_ca_file" % auth_type)
    if ca_file is not None and not needs_ca:
        # The toolkit's own rule: a CA that would never be used is a mistake.
        raise fail("tls_server_config: client_ca_file is set but client_auth_type %s does not"
                   " verify client certificates (use RequireAndVerifyClientCert)" % auth_type)
    if auth_type == "RequestClientCert":
        notes.append("web config %s: client_auth_type RequestClientCert: client certificates"
                     " are neither requested nor used (same as NoClientCert)" % path)
    return verify_mode, ca_file


def _context_with_versions(tls: dict, fail) -> ssl.SSLContext:
    """A server SSLContext limited to min_version..max_version."""
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _tls_string(tls, key, fail) or default
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
    return context


def _load_key_pair(context: ssl.SSLContext, cert_file: str, key_file: str, fail) -> None:
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
