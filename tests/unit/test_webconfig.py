"""The exporter-toolkit web configuration: loading, TLS served by a real
in-process gevent WSGIServer, client certificates, and basic auth.

Certificates are made with the openssl CLI; clients run in gevent's thread
pool (real threads, stdlib sockets) so the hub keeps serving meanwhile."""

import base64
import contextlib
import http.client
import shutil
import ssl
import subprocess
import threading
import time

import bcrypt
import gevent
import pytest
from gevent import pywsgi

from stapexporter_lib.web.basicauth import (AUTH_BUSY, AUTH_DENIED, AUTH_OK, AUTH_QUEUE,
                                            CHALLENGE, BasicAuth)
from stapexporter_lib.web.webconfig import WebConfigError, load, wrap_socket_args

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

# Real seconds a check may take to catch up with an event.
SETTLE = 5.0
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]


def openssl(cwd, *args):
    subprocess.run(["openssl"] + list(args), cwd=str(cwd), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_ca(d, name):
    openssl(d, "req", "-x509", *EC, "-subj", "/CN=%s" % name,
            "-keyout", name + ".key", "-out", name + ".crt")


def make_client(d, name, ca, serial):
    openssl(d, "req", "-new", *EC[:4], "-nodes", "-subj", "/CN=%s" % name,
            "-keyout", name + ".key", "-out", name + ".csr")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    openssl(d, "x509", "-req", "-in", name + ".csr", "-CA", ca + ".crt", "-CAkey", ca + ".key",
            "-set_serial", str(serial), "-days", "1", "-extfile", "client.ext",
            "-out", name + ".crt")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """server.crt/key (self-signed, SAN 127.0.0.1), other.crt/key (unrelated),
    ca.crt/key with client.crt/key signed by it, and rogue-ca with rogue.crt/key."""
    d = tmp_path_factory.mktemp("certs")
    openssl(d, "req", "-x509", *EC, "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", "server.key", "-out", "server.crt")
    openssl(d, "req", "-x509", *EC, "-subj", "/CN=other",
            "-keyout", "other.key", "-out", "other.crt")
    make_ca(d, "ca")
    make_client(d, "client", "ca", 2)
    make_ca(d, "rogue-ca")
    make_client(d, "rogue", "rogue-ca", 3)
    return d


@pytest.fixture
def confdir(tmp_path, certs):
    """A directory holding copies of the certificates, for configs to refer
    to by relative path."""
    d = tmp_path / "conf"
    shutil.copytree(str(certs), str(d))
    return d


def write_config(d, text, name="web.yml"):
    path = d / name
    path.write_text(text)
    return str(path)


def hash_pw(password):
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=4)).decode("ascii")


# -- serving -------------------------------------------------------------------

def tiny_app(environ, start_response):
    body = ("hello %s" % environ["PATH_INFO"]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@contextlib.contextmanager
def serving(config):
    server = pywsgi.WSGIServer(("127.0.0.1", 0), tiny_app, log=None,
                               **wrap_socket_args(config))
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=1)


def in_thread(fn, *args):
    """Run FN in a real thread while the hub keeps serving; returns
    ("ok", value) or ("error", exception)."""
    def call():
        try:
            return "ok", fn(*args)
        except Exception as e:  # noqa: BLE001 -- reported to the test
            return "error", e
    return gevent.get_hub().threadpool.apply(call)


def client_context(cafile, cert=None, key=None):
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def https_get(port, ctx, path="/metrics"):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get(port, path="/metrics"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- (1) TLS ---------------------------------------------------------------------

def test_tls_round_trip_and_plain_http_refused(confdir, certs, monkeypatch, capfd):
    path = write_config(confdir, "tls_server_config:\n  cert_file: server.crt\n"
                                 "  key_file: server.key\n")
    monkeypatch.chdir("/")      # paths are relative to the file, not the cwd
    config = load(path)
    assert isinstance(config.ssl_context, ssl.SSLContext)
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert config.users == {} and not config.auth_required
    assert wrap_socket_args(config) == {"ssl_context": config.ssl_context,
                                        "do_handshake_on_connect": False}

    with serving(config) as port:
        assert in_thread(https_get, port, client_context(certs / "server.crt")) == \
            ("ok", (200, b"hello /metrics"))
        kind, result = in_thread(http_get, port)
        assert kind == "error" or result[0] != 200, result
        # A client that does not trust the certificate fails the handshake.
        kind, result = in_thread(https_get, port, client_context(certs / "other.crt"))
        assert kind == "error" and isinstance(result, ssl.SSLError), result
    # Failed handshakes happen in the handler's first read, which pywsgi
    # treats as a dropped connection: no traceback per bad client.
    assert "Traceback" not in capfd.readouterr().err


def test_min_version_tls13(confdir, certs):
    path = write_config(confdir, "tls_server_config:\n  cert_file: server.crt\n"
                                 "  key_file: server.key\n  min_version: TLS13\n")
    config = load(path)
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    with serving(config) as port:
        ctx = client_context(certs / "server.crt")
        assert in_thread(https_get, port, ctx)[0] == "ok"
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        kind, result = in_thread(https_get, port, ctx)
        assert kind == "error" and isinstance(result, ssl.SSLError), result


def test_no_tls_section_means_plain_http(confdir):
    config = load(write_config(confdir, "basic_auth_users:\n  alice: '%s'\n" % hash_pw("pw")))
    assert config.ssl_context is None
    assert wrap_socket_args(config) == {} and wrap_socket_args(None) == {}
    assert config.auth_required and list(config.users) == ["alice"]
    assert isinstance(config.users["alice"], bytes)


def test_empty_file_is_no_tls_no_auth(confdir):
    config = load(write_config(confdir, "# nothing yet\n"))
    assert config.ssl_context is None and config.users == {} and not config.auth_required


def test_http_server_config_is_ignored_with_a_note(confdir):
    path = write_config(confdir, "http_server_config:\n  http2: false\n")
    config = load(path)
    assert config.ssl_context is None
    assert len(config.notes) == 1 and "http_server_config" in config.notes[0]
    assert path in config.notes[0]


# -- (2) client certificates ---------------------------------------------------------

CLIENT_CERT_CONFIG = """\
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: {auth_type}
  client_ca_file: ca.crt
"""


def outcome(port, ctx):
    kind, result = in_thread(https_get, port, ctx)
    return result if kind == "ok" else type(result)


def test_require_and_verify_client_cert(confdir, certs, capfd):
    config = load(write_config(confdir, CLIENT_CERT_CONFIG.format(
        auth_type="RequireAndVerifyClientCert")))
    assert config.ssl_context.verify_mode == ssl.CERT_REQUIRED
    with serving(config) as port:
        anonymous = client_context(certs / "server.crt")
        good = client_context(certs / "server.crt", certs / "client.crt", certs / "client.key")
        rogue = client_context(certs / "server.crt", certs / "rogue.crt", certs / "rogue.key")
        assert outcome(port, good) == (200, b"hello /metrics")
        # With TLS 1.3 the client learns of the refusal only when it reads:
        # an SSL alert or a closed connection, never a response.
        for ctx in (anonymous, rogue):
            failure = outcome(port, ctx)
            assert isinstance(failure, type) and issubclass(
                failure, (OSError, http.client.HTTPException)), failure
        assert outcome(port, good) == (200, b"hello /metrics")
    assert "Traceback" not in capfd.readouterr().err


def test_verify_client_cert_if_given(confdir, certs):
    config = load(write_config(confdir, CLIENT_CERT_CONFIG.format(
        auth_type="VerifyClientCertIfGiven")))
    assert config.ssl_context.verify_mode == ssl.CERT_OPTIONAL
    with serving(config) as port:
        assert outcome(port, client_context(certs / "server.crt")) == (200, b"hello /metrics")
        good = client_context(certs / "server.crt", certs / "client.crt", certs / "client.key")
        assert outcome(port, good) == (200, b"hello /metrics")
        rogue = client_context(certs / "server.crt", certs / "rogue.crt", certs / "rogue.key")
        assert outcome(port, rogue) != (200, b"hello /metrics")


# -- (3) basic auth ------------------------------------------------------------------

def basic(user, password):
    raw = ("%s:%s" % (user, password)).encode()
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(raw).decode("ascii")}


@pytest.fixture
def counted_checkpw(monkeypatch):
    calls = []
    real = bcrypt.checkpw

    def counting(password, hashed):
        calls.append((password, hashed))
        return real(password, hashed)
    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def test_basic_auth_right_wrong_missing(confdir, counted_checkpw):
    config = load(write_config(confdir, "basic_auth_users:\n  alice: %s\n  bob: %s\n"
                                        % (hash_pw("s3cret"), hash_pw("pässword"))))
    auth = BasicAuth(config.users)
    assert auth.verify(basic("alice", "s3cret")) == AUTH_OK
    assert auth.verify(basic("bob", "pässword")) == AUTH_OK
    assert auth.verify(basic("alice", "wrong")) == AUTH_DENIED
    assert auth.verify(basic("alice", "pässword")) == AUTH_DENIED      # bob's password
    assert auth.verify(basic("carol", "s3cret")) == AUTH_DENIED        # unknown user
    assert auth.verify({}) == AUTH_DENIED
    assert CHALLENGE == ("WWW-Authenticate", 'Basic realm="stap-exporter", charset="UTF-8"')


def test_basic_auth_success_is_cached_failure_is_not(counted_checkpw):
    auth = BasicAuth({"alice": hash_pw("s3cret").encode()})
    assert auth.verify(basic("alice", "s3cret")) == AUTH_OK
    assert auth.verify(basic("alice", "s3cret")) == AUTH_OK
    assert auth.verify(basic("alice", "s3cret")) == AUTH_OK
    assert len(counted_checkpw) == 1
    assert auth.verify(basic("alice", "nope")) == AUTH_DENIED
    assert auth.verify(basic("alice", "nope")) == AUTH_DENIED
    assert len(counted_checkpw) == 3
    # Unknown users still cost one bcrypt each (no timing hint), never cached.
    assert auth.verify(basic("mallory", "s3cret")) == AUTH_DENIED
    assert len(counted_checkpw) == 4


def test_a_verified_password_outlasts_any_time_and_a_full_queue(monkeypatch, counted_checkpw):
    """Hours later, with every check slot taken by wrong passwords, the
    verified password is still served at once, with no bcrypt check."""
    auth = BasicAuth({"alice": hash_pw("s3cret").encode()})
    assert auth.verify(basic("alice", "s3cret")) == AUTH_OK
    later = 6 * 3600
    for name in ("monotonic", "time"):
        real = getattr(time, name)
        monkeypatch.setattr(time, name, lambda real=real: real() + later)
    release = threading.Event()
    real_checkpw = bcrypt.checkpw

    def held_checkpw(password, hashed):
        release.wait(SETTLE)
        return real_checkpw(password, hashed)
    monkeypatch.setattr(bcrypt, "checkpw", held_checkpw)
    flood = [gevent.spawn(auth.verify, basic("alice", "wrong")) for _ in range(AUTH_QUEUE)]
    try:
        with gevent.Timeout(SETTLE, AssertionError("the queue never filled")):
            while auth._pending < AUTH_QUEUE:
                gevent.sleep(0.001)
        assert auth.verify(basic("alice", "wrong")) == AUTH_BUSY
        with gevent.Timeout(SETTLE, AssertionError("the verified password waited")):
            assert auth.verify(basic("alice", "s3cret")) == AUTH_OK
        assert len(counted_checkpw) == 1
    finally:
        release.set()
        gevent.joinall(flood, timeout=SETTLE)
    assert [g.value for g in flood] == [AUTH_DENIED] * AUTH_QUEUE


def test_basic_auth_remembers_one_password_per_user(counted_checkpw):
    # bcrypt reads the first 72 bytes: longer passwords are that password.
    long_password = "p" * 72
    auth = BasicAuth({"alice": hash_pw(long_password).encode(), "bob": hash_pw("b").encode()})
    for suffix in ("", "x", "yy"):
        assert auth.verify(basic("alice", long_password + suffix)) == AUTH_OK
    assert auth.verify(basic("bob", "b")) == AUTH_OK
    assert len(counted_checkpw) == 2 and len(auth._verified) == 2


@pytest.mark.parametrize("header", [
    "Basic", "Basic ", "Basic !!!notbase64!!!", "Basic YWxpY2U",          # bad padding
    "Basic " + base64.b64encode(b"alice-without-colon").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:s3cret").decode(),
    "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),
    "Basic " + base64.b64encode(b"alice:s3cret").decode() + "é",
    "Bearer " + base64.b64encode(b"alice:s3cret").decode(),
    "Digest username=alice", "", "\x00\x01",
])
def test_basic_auth_garbage_is_false(header, counted_checkpw):
    auth = BasicAuth({"alice": hash_pw("s3cret").encode()})
    assert auth.verify({"HTTP_AUTHORIZATION": header}) == AUTH_DENIED
    assert counted_checkpw == []


def test_basic_auth_scheme_case_and_long_password(counted_checkpw):
    auth = BasicAuth({"alice": hash_pw("s3cret").encode()})
    raw = base64.b64encode(b"alice:s3cret").decode()
    assert auth.verify({"HTTP_AUTHORIZATION": "basic  " + raw}) == AUTH_OK
    # bcrypt looks at 72 bytes; longer passwords are a failure, not a crash.
    assert auth.verify(basic("alice", "x" * 200)) == AUTH_DENIED


def test_basic_auth_does_not_block_the_hub(monkeypatch):
    threads = []

    def slow_checkpw(password, hashed):
        threads.append(threading.get_ident())
        time.sleep(0.3)
        return True
    monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
    ticks = []

    def ticker():
        while True:
            ticks.append(1)
            gevent.sleep(0.01)
    g = gevent.spawn(ticker)
    try:
        assert BasicAuth({"alice": hash_pw("x").encode()}).verify(
            basic("alice", "anything")) == AUTH_OK
    finally:
        g.kill()
    assert len(ticks) >= 5
    assert threads and threading.get_ident() not in threads     # ran in the thread pool


# -- (4) bad configurations ----------------------------------------------------------

TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"

BAD = [
    ("yaml", "tls_server_config:\n  cert_file: [unclosed\n", "line"),
    ("yaml-tab", "basic_auth_users:\n\talice: x\n", "line"),
    ("not-mapping", "- just\n- a list\n", "mapping"),
    ("unknown-top", TLS + "tls_config:\n  x: 1\n", "unknown key 'tls_config'"),
    ("rate-limit", "rate_limit:\n  interval: 1s\n  burst: 2\n", "rate_limit"),
    ("unknown-tls", TLS + "  cert_path: server.crt\n", "unknown key 'cert_path'"),
    ("sans", TLS + "  client_allowed_sans: [a]\n", "client_allowed_sans"),
    ("tls-empty", "tls_server_config:\n", "cert_file"),
    ("tls-list", "tls_server_config: [server.crt]\n", "mapping"),
    ("no-cert", "tls_server_config:\n  key_file: server.key\n", "missing cert_file"),
    ("no-key", "tls_server_config:\n  cert_file: server.crt\n", "missing key_file"),
    ("cert-missing", "tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
     "nope.crt"),
    ("key-missing", "tls_server_config:\n  cert_file: server.crt\n  key_file: nope.key\n",
     "nope.key"),
    ("cert-garbage", "tls_server_config:\n  cert_file: garbage.txt\n  key_file: server.key\n",
     "not a usable certificate"),
    ("cert-is-key", "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
     "not a usable certificate"),
    ("key-garbage", "tls_server_config:\n  cert_file: server.crt\n  key_file: garbage.txt\n",
     "garbage.txt"),
    ("mismatch", "tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n",
     "does not match"),
    ("auth-type", TLS + "  client_auth_type: RequireAndVerify\n", "invalid client_auth_type"),
    ("auth-any", TLS + "  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n",
     "not supported"),
    ("verify-no-ca", TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
     "needs client_ca_file"),
    ("if-given-no-ca", TLS + "  client_auth_type: VerifyClientCertIfGiven\n",
     "needs client_ca_file"),
    ("ca-without-policy", TLS + "  client_ca_file: ca.crt\n", "client_ca_file"),
    ("ca-missing", TLS + "  client_auth_type: RequireAndVerifyClientCert\n"
                         "  client_ca_file: nope-ca.crt\n", "nope-ca.crt"),
    ("ca-garbage", TLS + "  client_auth_type: RequireAndVerifyClientCert\n"
                         "  client_ca_file: garbage.txt\n", "not a usable certificate"),
    ("min-version", TLS + "  min_version: TLS1.2\n", "invalid min_version"),
    ("min-above-max", TLS + "  min_version: TLS13\n  max_version: TLS12\n", "above"),
    ("cert-not-string", "tls_server_config:\n  cert_file: [a, b]\n  key_file: server.key\n",
     "must be a string"),
    ("users-list", "basic_auth_users:\n  - alice\n", "mapping"),
    ("plain-password", "basic_auth_users:\n  alice: hunter2\n", "not a bcrypt hash"),
    ("sha-password", "basic_auth_users:\n  alice: '{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ='\n",
     "not a bcrypt hash"),
    ("truncated-hash", "basic_auth_users:\n  alice: '$2y$10$X0h1gDsPszWURQaxFh'\n",
     "not a bcrypt hash"),
    ("numeric-password", "basic_auth_users:\n  alice: 1234\n", "not a bcrypt hash"),
    ("colon-user", "basic_auth_users:\n  'a:b': '$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQ"
                   "NJgRrnGs7EsimhC7zG'\n", "':'"),
    ("duplicate-user", "basic_auth_users:\n  alice: x\n  alice: y\n", "duplicate key 'alice'"),
]


@pytest.mark.parametrize("name,text,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_config(confdir, name, text, expect):
    (confdir / "garbage.txt").write_text("this is not PEM\n")
    path = write_config(confdir, text)
    with pytest.raises(WebConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert path in message
    assert expect in message, message


def test_yaml_error_names_the_line(confdir):
    path = write_config(confdir, "basic_auth_users:\n  alice: x\n  bob: [\n")
    with pytest.raises(WebConfigError, match=r"line [34]\b"):
        load(path)


def test_missing_and_unreadable_files(tmp_path):
    missing = str(tmp_path / "absent.yml")
    with pytest.raises(WebConfigError) as info:
        load(missing)
    assert missing in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(WebConfigError, match="cannot read"):
        load(str(tmp_path))                             # a directory
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"basic_auth_users:\n  \xff\xfe: x\n")
    with pytest.raises(WebConfigError, match="UTF-8") as info:
        load(str(binary))
    assert str(binary) in str(info.value)


def test_encrypted_key_is_refused_without_prompting(confdir):
    openssl(confdir, "ec", "-in", "server.key", "-aes256", "-passout", "pass:secret",
            "-out", "encrypted.key")
    path = write_config(confdir, "tls_server_config:\n  cert_file: server.crt\n"
                                 "  key_file: encrypted.key\n")
    with pytest.raises(WebConfigError, match="encrypted") as info:
        load(path)
    assert path in str(info.value)


def test_control_characters_in_messages_are_escaped(tmp_path):
    d = tmp_path / "a\nb"
    d.mkdir()
    with pytest.raises(WebConfigError) as info:
        load(str(d / "web.yml"))
    assert "\n" not in str(info.value) and "a\\x0ab" in str(info.value)

