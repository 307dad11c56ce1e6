"""Fleet discovery: GET /targets (Prometheus http_sd) end to end, the
--advertise-address option, the PCP helper that turns /targets into
pmdaopenmetrics .url files, and a real Prometheus that scrapes every script
of three exporters through one http_sd_configs job."""

import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT, Exporter, stop_and_check, wait_for, write_script
from test_peers import free_port, need, query, start_prometheus
from webhelpers import https_get, tls_files, write_config  # noqa: F401 (fixture)

PCP_URLS = os.path.join(ROOT, "tools", "stap-exporter-pcp-urls")
ESC_NAME = "e\x1b]0;OWNED\x07x.stp"
ODD_NAMES = ["a b.stp", "100%.stp", "q?x.stp", "\u00fc.stp", ESC_NAME]


def targets(exp, host=None):
    headers = {"Host": host} if host else {}
    r = exp.get("/targets", headers=headers)
    assert r.status == 200, r
    assert r.header("Content-Type").startswith("application/json")
    return json.loads(r.body)


def raw_get(exp, request: bytes) -> bytes:
    """Send REQUEST bytes as they are (http.client refuses hostile headers);
    the answer, read until the server closes."""
    with socket.create_connection((exp.host, exp.port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def groups_by_script(groups):
    return {g["labels"]["script"]: g for g in groups}


def test_targets_lists_every_script_and_starts_nothing(dirs, exporter_factory):
    scripts, _ = dirs
    for name in ["a.stp", "b.stp"] + ODD_NAMES:
        write_script(scripts, name)
    (scripts / "notes.txt").write_text("not a script\n")
    (scripts / "dir.stp").mkdir()
    exp = exporter_factory()
    groups = targets(exp)
    assert sorted(groups_by_script(groups)) == sorted(["a.stp", "b.stp"] + ODD_NAMES)
    address = "127.0.0.1:%d" % exp.port
    for script, group in groups_by_script(groups).items():
        assert group["targets"] == [address]
        assert group["labels"] == {"__metrics_path__": "/" + script, "script": script}
    assert not exp.children(), "/targets must not start any script"
    assert "event=spawned" not in exp.log_text()
    # Control characters are JSON escapes, never raw bytes.
    body = exp.get("/targets").body
    assert b"\x1b" not in body and b"\x07" not in body and b"\\u001b]0;OWNED\\u0007" in body
    # Every metrics path, percent-encoded as Prometheus does, reaches its script.
    for script in ODD_NAMES:
        path = "/" + urllib.parse.quote(script)
        assert exp.get_until(path).status == 200, script


def test_targets_follow_the_directory_without_a_rescan(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    write_script(scripts, "gone.stp")
    exp = exporter_factory()
    assert sorted(groups_by_script(targets(exp))) == ["a.stp", "gone.stp"]
    write_script(scripts, "new.stp")
    os.unlink(str(scripts / "gone.stp"))
    assert sorted(groups_by_script(targets(exp))) == ["a.stp", "new.stp"]
    assert not exp.children()


@pytest.mark.parametrize("host,advertised", [
    ("stap-1.example.org:9900", "stap-1.example.org:9900"),
    ("10.1.2.3:19100", "10.1.2.3:19100"),
    ("[2001:db8::7]:9900", "[2001:db8::7]:9900"),
    ("stap-1.example.org", "stap-1.example.org:80"),
])
def test_targets_advertise_the_host_the_client_used(dirs, exporter_factory, host, advertised):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory()
    assert targets(exp, host)[0]["targets"] == [advertised]


HOSTILE_HOSTS = [b'evil"}],"x":"', b"a b:80", b"x:99999", b"x:0", b"[::1", b"[::1]x",
                 b"[fe80::1%eth0]:80", b"::1:80", b"host:80/../x", b"\x1b]0;OWNED\x07:80",
                 b"h\xc3\xbcst:80", b"-" * 400]


def test_hostile_host_header_is_never_echoed(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory()
    local = "127.0.0.1:%d" % exp.port
    for host in HOSTILE_HOSTS + [None]:
        request = b"GET /targets HTTP/1.1\r\n"
        request += b"Host: " + host + b"\r\n" if host is not None else b""
        data = raw_get(exp, request + b"Connection: close\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), (host, data[:300])
        assert json.loads(body)[0]["targets"] == [local], host
    exp.wait_log(r"event=targets msg=\"refused Host header .*evil.* advertising the local address %s"
                 % local.replace(".", r"\."))
    assert "\x1b" not in exp.log_text()


def test_targets_local_address_over_ipv6(dirs, exporter_factory):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    try:
        exp = exporter_factory(host="::1")
    except AssertionError as exc:
        pytest.skip("cannot listen on ::1: %s" % exc)
    assert targets(exp, "[::1]:%d" % exp.port)[0]["targets"] == ["[::1]:%d" % exp.port]
    data = raw_get(exp, b"GET /targets HTTP/1.0\r\n\r\n")  # no Host at all
    assert json.loads(data.partition(b"\r\n\r\n")[2])[0]["targets"] == ["[::1]:%d" % exp.port]


def test_advertise_address_overrides_the_host(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory(["--advertise-address", "[2001:DB8::1]:443"])
    assert targets(exp, "127.0.0.1:1")[0]["targets"] == ["[2001:db8::1]:443"]


@pytest.mark.parametrize("value", ["stap.example.org", "a b:1", "[::1]", "x:70000", ""])
def test_bad_advertise_address_is_a_usage_error(dirs, value):
    scripts, procfs = dirs
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "stapexporter.py"), "-s",
                           str(scripts), "--advertise-address", value],
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stap-exporter: error: --advertise-address")


def test_targets_need_auth_and_say_https_under_tls(dirs, exporter_factory, tmp_path,
                                                   tls_files):  # noqa: F811
    key, crt = tls_files
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory(["--web-config", str(write_config(tmp_path, key, crt))])
    assert https_get(exp.port, crt, "/targets")[0] == 401
    status, headers, body = https_get(exp.port, crt, "/targets", b"prom:s3cret")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == [{"targets": ["127.0.0.1:%d" % exp.port], "labels": {
        "__metrics_path__": "/a.stp", "script": "a.stp", "__scheme__": "https"}}]
    assert not exp.children()


# -- PCP: one .url file per script ---------------------------------------------------

def run_pcp_urls(*args):
    return subprocess.run([sys.executable, PCP_URLS] + list(args), capture_output=True,
                          timeout=60)


def test_pcp_helper_writes_one_url_file_per_script(dirs, exporter_factory, tmp_path):
    scripts, _ = dirs
    for name in ("timer-ticks.stp", "b.stp", "a b.stp"):
        write_script(scripts, name)
    exp = exporter_factory()
    confd = tmp_path / "config.d"
    url = "http://127.0.0.1:%d/targets" % exp.port
    proc = run_pcp_urls("--dir", str(confd), "--name", "web1", url)
    assert proc.returncode == 0, proc.stderr
    files = sorted(os.listdir(str(confd / "web1")))
    assert len(files) == 3 and "b.url" in files
    for name in files:
        first = (confd / "web1" / name).read_text().splitlines()[0]
        # pmdaopenmetrics makes PCP names from file names: [A-Za-z][A-Za-z0-9_]*.url
        assert name[0].isalpha() and name[:-4].replace("_", "").isalnum(), name
        with urllib.request.urlopen(first, timeout=10) as r:  # each URL serves its script
            assert r.status == 200 and b"fake_up" in r.read()
    # A script removed from the exporter loses its file; foreign files stay.
    (confd / "web1" / "mine.url").write_text("http://elsewhere/x\n")
    os.unlink(str(scripts / "b.stp"))
    write_script(scripts, "c.stp")
    proc = run_pcp_urls("--dir", str(confd), "--name", "web1", url)
    assert proc.returncode == 0, proc.stderr
    files = sorted(os.listdir(str(confd / "web1")))
    assert "b.url" not in files and "c.url" in files and "mine.url" in files
    assert "removed b.url" in proc.stdout.decode()


def test_pcp_helper_fails_in_one_line(tmp_path):
    port = free_port()
    for args, status in [(["http://127.0.0.1:%d/targets" % port], 1), (["ftp://x/"], 2),
                         (["--name", "9bad", "http://x/"], 2), ([], 2)]:
        proc = run_pcp_urls("--dir", str(tmp_path), *args)
        assert proc.returncode == status, (args, proc.stderr)
        lines = proc.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stap-exporter-pcp-urls: error:"), lines


# -- a real Prometheus, one job over three hosts -------------------------------------

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def up_targets(api):
    """{(instance, script): value} of up for the fleet job."""
    return {(r["metric"]["instance"], r["metric"].get("script")): r["value"][1]
            for r in query(api, 'up{job="stap"}')}


@pytest.mark.peers
def test_one_prometheus_job_scrapes_every_script_on_every_host(tmp_path):
    need("prometheus")
    exporters = []
    try:
        for i, host in enumerate(HOSTS):
            scripts, procfs = tmp_path / ("scripts%d" % i), tmp_path / ("procfs%d" % i)
            scripts.mkdir()
            procfs.mkdir()
            for name in ("a.stp", "b.stp") + (("c d.stp", "\u00fc.stp") if i == 0 else ()):
                write_script(scripts, name)
            exporters.append(Exporter(scripts, procfs, host=host))
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
                  "scrape_configs": [{"job_name": "stap", "http_sd_configs": [
                      {"url": "http://%s:%d/targets" % (e.host, e.port), "refresh_interval": "1s"}
                      for e in exporters]}]}
        prom, api = start_prometheus(tmp_path, config)
        try:
            expected = {("%s:%d" % (e.host, e.port), name)
                        for e in exporters for name in os.listdir(e.scripts)}
            assert len(expected) == 8

            def all_up():
                up = up_targets(api)
                return up if set(up) == expected and set(up.values()) == {"1"} else None
            wait_for(all_up, timeout=60, interval=0.5, message="every script on every host up")
            # A script added to one host is found and scraped; nothing restarts.
            write_script(exporters[1].scripts, "added.stp")
            expected.add(("%s:%d" % (exporters[1].host, exporters[1].port), "added.stp"))
            wait_for(all_up, timeout=30, interval=0.5, message="the added script up")
            assert prom.poll() is None
            reads = query(api, 'fake_reads_total{exported_script="added.stp"}')
            assert reads and reads[0]["metric"]["instance"].startswith(HOSTS[1])
        finally:
            prom.terminate()
            prom.wait(20)
    finally:
        for exp in exporters:
            stop_and_check(exp)
