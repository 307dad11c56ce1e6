"""Keep-alive connections, end to end: a connection in use is never
closed under a client; an idle one is closed after --header-timeout, between
requests; a request whose first byte arrived is answered; the last response
before a close the server knows of says ``Connection: close``."""

import http.client
import signal
import socket
import time

from conftest import wait_for, write_script

HEADER_TIMEOUT = 1.0


def _connection_port(conn):
    return conn.sock.getsockname()[1] if conn.sock is not None else None


def test_busy_connection_outlives_the_header_timeout(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    exp = exporter_factory(["--header-timeout", str(HEADER_TIMEOUT)])
    exp.get_until("/quick.stp")
    conn = http.client.HTTPConnection(exp.host, exp.port, timeout=5)
    try:
        conn.connect()
        port = _connection_port(conn)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 3.5 * HEADER_TIMEOUT:
            conn.request("GET", "/quick.stp" if n % 2 else "/-/healthy")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (n, body)
            # http.client reconnects silently when the server closed: the
            # local port tells that it did not happen.
            assert _connection_port(conn) == port, "reconnected after %d requests" % n
            n += 1
        assert n > 50
    finally:
        conn.close()
    assert "closing idle connection" not in exp.log_text()


def test_pipelined_requests_outlive_the_header_timeout(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    exp = exporter_factory(["--header-timeout", str(HEADER_TIMEOUT)])
    exp.get_until("/quick.stp")
    batch = b"GET /quick.stp HTTP/1.1\r\nHost: x\r\n\r\n" * 10
    with socket.create_connection((exp.host, exp.port), timeout=5) as s:
        f = s.makefile("rb")
        t0 = time.monotonic()
        answered = 0
        while time.monotonic() - t0 < 3.5 * HEADER_TIMEOUT:
            s.sendall(batch)
            for _ in range(10):
                status, headers = _read_response(f)
                assert status == 200, (status, headers[":body"], exp.log_text()[-3000:])
                assert headers.get("connection") != "close"
                answered += 1
        s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers = _read_response(f)
        assert status == 200 and headers.get("connection") == "close"
        assert f.read() == b""
    assert answered >= 100


def _read_response(f):
    line = f.readline()
    assert line.startswith(b"HTTP/1.1 "), line
    headers = {}
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", "0")))
    headers[":body"] = body
    return int(line.split()[1]), headers


def test_idle_connection_is_closed_after_the_header_timeout(dirs, exporter_factory):
    exp = exporter_factory(["--header-timeout", str(HEADER_TIMEOUT)])
    with socket.create_connection((exp.host, exp.port), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(f)[0] == 200
        t0 = time.monotonic()
        assert f.read() == b"", "the server sent something to an idle connection"
        idle = time.monotonic() - t0
    assert 0.8 * HEADER_TIMEOUT < idle < 2.5 * HEADER_TIMEOUT, idle
    exp.wait_log(r'event=http client=127\.0\.0\.1:\d+ msg="closing idle connection after 1 s')


def test_a_request_started_just_before_the_idle_limit_is_answered(dirs, exporter_factory):
    """The first byte restarts the clock: the headers get a full
    --header-timeout of their own, and a late request gets 408, not EOF."""
    exp = exporter_factory(["--header-timeout", str(HEADER_TIMEOUT)])
    with socket.create_connection((exp.host, exp.port), timeout=5) as s:
        time.sleep(0.7 * HEADER_TIMEOUT)     # idle, but not for long enough
        s.sendall(b"GET /-/hea")
        time.sleep(0.7 * HEADER_TIMEOUT)     # past the idle limit, counted from connect
        s.sendall(b"lthy HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _ = _read_response(s.makefile("rb"))
        assert status == 200
    with socket.create_connection((exp.host, exp.port), timeout=5) as s:
        s.sendall(b"GET /-/healthy HTTP/1.1\r\n")       # and never the rest
        f = s.makefile("rb")
        status, headers = _read_response(f)
        assert status == 408 and headers.get("connection") == "close"
        assert f.read() == b""


def test_stopping_closes_idle_connections_and_finishes_busy_ones(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "slow.stp", "mode=fifo never_write")
    exp = exporter_factory(["--scrape-timeout", "2"])
    idle = socket.create_connection((exp.host, exp.port), timeout=10)
    busy = socket.create_connection((exp.host, exp.port), timeout=10)
    try:
        idle_f = idle.makefile("rb")
        idle.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(idle_f)[0] == 200
        busy.sendall(b"GET /slow.stp HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: exp.children(), timeout=10, message="slow.stp to start")
        exp.signal(signal.SIGTERM)
        # The idle connection is closed at once, with nothing sent on it.
        t0 = time.monotonic()
        assert idle_f.read() == b""
        assert time.monotonic() - t0 < 1.5
        # The request in flight gets its answer, marked as the last one.
        status, headers = _read_response(busy.makefile("rb"))
        assert status == 503
        assert headers.get("connection") == "close"
    finally:
        idle.close()
        busy.close()
    assert exp.proc.wait(20) == 0
