"""--web-config end to end: the daemon serves TLS and demands basic auth."""

import base64
import http.client
import ssl
import subprocess
import sys

import bcrypt
import pytest

from conftest import EXPORTER, ROOT, write_script


@pytest.fixture
def tls_files(tmp_path):
    key, crt = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=30)
    return key, crt


def write_config(tmp_path, key, crt, password=b"s3cret"):
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds=4)).decode()
    cfg = tmp_path / "web.yml"
    cfg.write_text("tls_server_config:\n  cert_file: %s\n  key_file: %s\n"
                   "basic_auth_users:\n  prom: '%s'\n" % (crt.name, key.name, hashed))
    return cfg


def https_get(port, crt, path, auth=None):
    ctx = ssl.create_default_context(cafile=str(crt))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth).decode()
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_tls_and_basic_auth(dirs, exporter_factory, tmp_path, tls_files):
    key, crt = tls_files
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    cfg = write_config(tmp_path, key, crt)
    exp = exporter_factory(["--web-config", str(cfg)])
    exp.wait_log(r"event=web-config .*TLS on, basic auth on \(1 users\)")
    status, headers, body = https_get(exp.port, crt, "/a.stp")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Basic realm="stap-exporter"')
    assert not exp.children(), "an unauthenticated request must not start anything"
    assert https_get(exp.port, crt, "/a.stp", b"prom:wrong")[0] == 401
    assert https_get(exp.port, crt, "/metrics", b"prom:wrong")[0] == 401
    for _ in range(50):
        status, _, body = https_get(exp.port, crt, "/a.stp", b"prom:s3cret")
        if status == 200:
            break
    assert status == 200 and b"fake_up" in body
    # Plain HTTP on the TLS port gets nothing useful.
    try:
        r = exp.get("/a.stp", timeout=3)
    except (http.client.HTTPException, OSError):
        pass
    else:
        assert r.status != 200, r


@pytest.mark.parametrize("content,fragment", [
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "nope"),
    ("basic_auth_users:\n  prom: plaintext\n", "bcrypt"),
    ("bogus_key: 1\n", "bogus_key"),
    ("tls_server_config: [\n", "web.yml"),
])
def test_bad_web_config_is_a_one_line_startup_error(tmp_path, content, fragment):
    cfg = tmp_path / "web.yml"
    cfg.write_text(content)
    proc = subprocess.run([sys.executable, EXPORTER, "-s", str(tmp_path), "-p", "0",
                           "--listen", "127.0.0.1", "--web-config", str(cfg)],
                          capture_output=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stap-exporter: error: "), err
    assert fragment in lines[0], err


def test_missing_web_config_file(tmp_path):
    proc = subprocess.run([sys.executable, EXPORTER, "-s", str(tmp_path), "-p", "0",
                           "--web-config", str(tmp_path / "absent.yml")],
                          capture_output=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "absent.yml" in err
