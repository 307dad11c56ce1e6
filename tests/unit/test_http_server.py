"""The HTTP server in-process: the deadline for a request's line and
headers.  The client runs in gevent's thread pool (a real thread, stdlib
sockets) so the hub keeps serving meanwhile."""

import socket
import sys
import time

import gevent

from conftest import ROOT

sys.path.insert(0, ROOT)
from stapexporter_lib import cli  # noqa: E402
from stapexporter_lib.web import http as srv  # noqa: E402


def ok_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def drip_headers(port):
    """(first bytes of the answer, seconds until it came) for a client that
    sends its headers a byte every 0.1 s and never ends them."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /-/healthy HTTP/1.1\r\n")
        s.settimeout(0.1)
        drip = b"X-Slow: a\r\n"
        sent = 0
        while time.monotonic() - t0 < 10:
            try:
                return s.recv(65536), time.monotonic() - t0
            except socket.timeout:
                s.send(drip[sent % len(drip):][:1])
                sent += 1
    return b"", time.monotonic() - t0


def test_request_headers_have_a_short_deadline_whatever_the_idle_limit(monkeypatch):
    """A client that drips its headers gets 408 after HEAD_TIMEOUT (the
    documented 10 s, shortened here), though idle keep-alive connections
    are kept for --header-timeout (30 s)."""
    assert "headers (at most %g)" % srv.HEAD_TIMEOUT in " ".join(cli.USAGE.split())
    monkeypatch.setattr(srv, "HEAD_TIMEOUT", 1.0)
    server = srv.Server(("127.0.0.1", 0), ok_app, header_timeout=30.0, max_connections=512,
                        max_per_client=64, send_timeout=10.0, log=None)
    server.start()
    try:
        data, took = gevent.get_hub().threadpool.apply(drip_headers, (server.server_port,))
    finally:
        server.stop(timeout=1)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert 0.9 < took < 5, took
