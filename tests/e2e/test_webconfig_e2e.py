"""--web-config end to end: the daemon serves TLS and demands basic auth."""

import http.client
import signal
import ssl
import subprocess
import sys

import pytest

from conftest import EXPORTER, ROOT, write_script
from webhelpers import https_get, make_tls_files, tls_files, write_config  # noqa: F401


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


def test_sighup_reads_the_web_config_again(dirs, exporter_factory, tmp_path, tls_files):
    """New users and a new certificate serve new connections without a
    restart; a broken file on SIGHUP changes nothing and says why."""
    key, crt = tls_files
    cfg = write_config(tmp_path, key, crt, b"old")
    exp = exporter_factory(["--web-config", str(cfg)])
    assert https_get(exp.port, crt, "/metrics", b"prom:old")[0] == 200
    key2, crt2 = make_tls_files(tmp_path, "rotated")
    write_config(tmp_path, key2, crt2, b"new")
    mark = len(exp.log_lines)
    exp.signal(signal.SIGHUP)
    exp.wait_log(r"event=web-config .*reloaded: TLS on, basic auth on \(1 users\)", start=mark)
    assert https_get(exp.port, crt2, "/metrics", b"prom:new")[0] == 200
    assert https_get(exp.port, crt2, "/metrics", b"prom:old")[0] == 401
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(exp.port, crt, "/metrics", b"prom:new")  # the old certificate is gone
    cfg.write_text("bogus_key: 1\n")
    mark = len(exp.log_lines)
    exp.signal(signal.SIGHUP)
    line = exp.wait_log(r"level=error event=web-config ", start=mark)
    assert "bogus_key" in line and "the running configuration stays" in line
    assert https_get(exp.port, crt2, "/metrics", b"prom:new")[0] == 200
    assert https_get(exp.port, crt2, "/metrics", b"prom:old")[0] == 401
    assert exp.proc.poll() is None


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
