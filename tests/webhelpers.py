"""TLS test material shared by the end-to-end and real tiers: a key and a
self-signed certificate, a web config file, an HTTPS GET."""

import base64
import http.client
import ssl
import subprocess

import bcrypt
import pytest


@pytest.fixture
def tls_files(tmp_path):
    return make_tls_files(tmp_path)


def make_tls_files(directory, stem="server"):
    """(key, self-signed certificate for 127.0.0.1) made in DIRECTORY."""
    key, crt = directory / (stem + ".key"), directory / (stem + ".crt")
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
