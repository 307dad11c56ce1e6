"""HTTP behaviour of a running exporter, end to end, with the stand-in stap."""

import os
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Exporter, make_dirs, stop_and_check, write_script

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def write_scripts(scripts):
    write_script(scripts, "quick.stp", "compile=0")
    write_script(scripts, "slow.stp", "compile=30")
    write_script(scripts, "broken.stp", "fail")
    write_script(scripts, "fifo.stp", "mode=fifo")


@pytest.fixture
def exporter(dirs, exporter_factory):
    write_scripts(dirs[0])
    return exporter_factory()


@pytest.fixture(scope="module")
def untouched(tmp_path_factory):
    """One exporter for the requests that must start nothing: none does."""
    scripts, procfs = make_dirs(tmp_path_factory.mktemp("untouched"))
    write_scripts(scripts)
    exp = Exporter(scripts, procfs)
    try:
        yield exp
    finally:
        stop_and_check(exp)


def test_unknown_script_is_404(exporter):
    r = exporter.get("/nosuch.stp")
    assert r.status == 404
    assert r.header("Content-Type").startswith("text/plain")
    assert "nosuch.stp" in r.text


def test_quick_script_answers_200_on_first_request(exporter):
    r = exporter.get("/quick.stp")
    assert r.status == 200, r
    assert r.header("Content-Type") == METRICS_TYPE
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert "fake_up" in families


@pytest.mark.parametrize("mode", ["file", "fifo"])
def test_body_is_relayed_byte_for_byte(exporter, dirs, mode):
    scripts, procfs = dirs
    # One line and a padding comment: the same text on every cycle, so the
    # body can be compared with what the script wrote, byte for byte.
    name = "steady-%s.stp" % mode
    write_script(scripts, name, "mode=%s lines=1 pad=200000" % mode)
    r = exporter.get_until("/" + name)
    expected = ('fake_up{script="%s"} 1\n# ' % name).encode()
    expected += b"x" * (200000 - len(expected) - 1) + b"\n"
    assert r.body == expected
    if mode == "file":
        module = [d for d in os.listdir(str(procfs))
                  if d.startswith(exporter.module_prefix) and "_steady_file" in d][0]
        with open(os.path.join(str(procfs), module, "__prometheus"), "rb") as f:
            assert r.body == f.read()


def test_compiling_script_is_503_with_retry_after(exporter):
    r = exporter.get("/slow.stp")
    assert r.status == 503
    assert r.text.startswith("Refresh page to access metrics.")
    assert int(r.header("Retry-After")) >= 1
    # Still compiling on the next request: 503 again, the same start.
    r2 = exporter.get("/slow.stp")
    assert r2.status == 503
    assert len(exporter.child_groups()) == 1


def test_failed_script_is_502_with_its_stderr_then_restarts(exporter):
    r = exporter.get("/broken.stp")
    if r.status == 503:  # it had not failed yet within the first second
        r = exporter.get_until("/broken.stp", 502)
    assert r.status == 502, r
    assert "semantic error: fake failure in broken.stp" in r.text
    assert "exit status 1" in r.text
    assert "Traceback" not in r.text
    starts = _starts(exporter, "broken.stp")
    # The next request tries a fresh start.
    exporter.get("/broken.stp")
    assert _starts(exporter, "broken.stp") == starts + 1


def _starts(exporter, name):
    for line in exporter.get("/").text.splitlines():
        if line.startswith(name + " "):
            return int(line.split()[4])
    raise AssertionError("no row for %s" % name)


def test_fifo_script(exporter):
    r = exporter.get_until("/fifo.stp")
    families = list(text_string_to_metric_families(r.text))
    assert families
    # One cycle of output, not two glued together.
    assert r.text.count("fake_up{") == 1


def test_head_is_get_without_body(exporter):
    get = exporter.get_until("/quick.stp")
    head = exporter.request("/quick.stp", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.header("Content-Type") == METRICS_TYPE
    assert abs(int(head.header("Content-Length")) - len(get.body)) <= 8
    assert exporter.request("/nosuch.stp", method="HEAD").status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_are_405(untouched, method):
    r = untouched.request("/quick.stp", method=method)
    assert r.status == 405
    assert r.header("Allow") == "GET, HEAD"
    assert not untouched.children(), "a 405 must not start the script"


def test_index_plain_text(exporter):
    exporter.get_until("/quick.stp")
    r = exporter.get("/")
    assert r.status == 200
    assert r.header("Content-Type").startswith("text/plain")
    table = r.text.split("\n\n")[0].splitlines()[2:]
    rows = {line.split()[0]: line.split() for line in table}
    assert set(rows) == {"quick.stp", "slow.stp", "broken.stp", "fifo.stp"}
    quick = rows["quick.stp"]
    assert quick[1] == "running"
    assert int(quick[2]) in exporter.children()
    assert quick[4] == "1"
    assert rows["slow.stp"][1] == "stopped"


def test_index_html(exporter):
    r = exporter.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert r.status == 200
    assert r.header("Content-Type").startswith("text/html")
    assert '<a href="quick.stp">quick.stp</a>' in r.text
    assert "<th>state</th>" in r.text


def test_index_shows_last_error_and_stderr(exporter):
    exporter.get_until("/broken.stp", 502)
    r = exporter.get("/")
    assert "exit status 1" in r.text
    assert "broken.stp: last lines of standard error:" in r.text
    assert "  semantic error: fake failure in broken.stp" in r.text
    h = exporter.get("/", headers={"Accept": "text/html"})
    assert "<pre>semantic error: fake failure in broken.stp" in h.text


def test_query_string_is_ignored(exporter):
    assert exporter.get_until("/quick.stp?foo=bar&x=1").status == 200


def test_percent_encoding_is_decoded(exporter):
    assert exporter.get_until("/%71uick.stp").status == 200  # %71 = q


@pytest.mark.parametrize("path", [
    "/../quick.stp", "/%2e%2e/quick.stp", "/..%2fquick.stp", "/sub/quick.stp",
    "/%2fetc%2fpasswd.stp", "/quick.stp%00", "/.hidden.stp", "/..", "/quick.stp/",
    "/%5c..%5cquick.stp", "/" + "a" * 300 + ".stp", "/.stp", "/quick",
])
def test_paths_outside_the_directory_are_404(untouched, path):
    r = untouched.get(path)
    assert r.status == 404, (path, r)
    assert not untouched.children()


def test_accepted_sockets_get_tcp_nodelay(monkeypatch):
    # pywsgi writes headers and body separately: without TCP_NODELAY a
    # keep-alive client waits ~40 ms for the delayed ACK on every response.
    from stapexporter_lib.web import http as srv
    seen = []
    monkeypatch.setattr(srv.pywsgi.WSGIServer, "handle", lambda self, sock, addr: seen.append(
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=5)
    accepted, addr = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        server = srv.Server(("127.0.0.1", 0), lambda e, s: [], header_timeout=30.0,
                            max_connections=512, max_per_client=64, send_timeout=10.0)
        server.handle(accepted, addr)
        assert seen and seen[0] != 0
    finally:
        for s in (client, accepted, listener):
            s.close()


@pytest.mark.parametrize("listen,connect", [("::1", "::1"), ("::", "127.0.0.1"),
                                            ("::", "::1"), ("127.0.0.1", "127.0.0.1"),
                                            (None, "127.0.0.1"), (None, "::1")])
def test_listen_addresses(dirs, listen, connect):
    import http.client
    scripts, procfs = dirs
    exp = Exporter(scripts, procfs, host=listen)
    try:
        conn = http.client.HTTPConnection(connect, exp.port, timeout=5)
        conn.request("GET", "/-/healthy")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        exp.stop()
