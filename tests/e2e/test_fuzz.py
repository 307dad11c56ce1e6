"""Fuzzing the HTTP front end of one real exporter (started once for the
module) with random bytes and mutated HTTP requests.

Every connection has a deadline: the client half-closes after sending, so the
server must answer or close promptly.  A response is either nothing (closed)
or an HTTP/1.x status line with a 2xx, 3xx or 4xx status -- or 502/503, which
a script may legitimately produce; never a 500, never a hang.  Afterwards the
daemon is alive, answers a good request and has logged no traceback."""

import os
import re
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Exporter, make_dirs, stop_and_check, write_script

DEADLINE = 5.0
STATUS_RE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")


@pytest.fixture(scope="module")
def fuzz_exporter(tmp_path_factory):
    scripts, procfs = make_dirs(tmp_path_factory.mktemp("fuzz"))
    write_script(scripts, "good.stp")
    write_script(scripts, "fifo.stp", "mode=fifo")
    write_script(scripts, "broken.stp", "fail")
    exp = Exporter(scripts, procfs, args=["--header-timeout", "3"],
                   env={"STAPEXP_FUZZ_CANARY": "canary-fuzz-31c7"})
    try:
        assert exp.get_until("/good.stp").status == 200
        yield exp
    finally:
        stop_and_check(exp)


def send(exp, data):
    """Send DATA, half-close, read until the server closes.  Returns
    (response bytes, seconds); fails on a hang."""
    t0 = time.monotonic()
    with socket.create_connection((exp.host, exp.port), timeout=DEADLINE) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        chunks = []
        while True:
            left = DEADLINE - (time.monotonic() - t0)
            assert left > 0, "no end of response within %.0fs for %r" % (DEADLINE, data[:200])
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                raise AssertionError("hang: nothing more within %.0fs for %r (got %r)"
                                     % (DEADLINE, data[:200], b"".join(chunks)[:200]))
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - t0


def check_response(data, request):
    if not data:
        return
    for m in re.finditer(rb"HTTP/1\.[01] (\d{3}) ", data):
        code = int(m.group(1))
        # (Finditer also catches status-like text inside bodies; bodies here
        # never contain it except as real pipelined responses.)
        assert 200 <= code < 500 or code in (502, 503), (code, request[:300], data[:300])
    m = STATUS_RE.match(data)
    assert m, "not an HTTP response: %r for %r" % (data[:200], request[:200])
    assert b"Traceback" not in data
    assert b"canary-fuzz-31c7" not in data


METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"get", b"G\x00T", b"", b"CONNECT",
           b"TRACE", b"GET GET", b"\xff\xfe"]
PATHS = [b"/", b"/good.stp", b"/fifo.stp", b"/broken.stp", b"/metrics", b"/-/healthy",
         b"/-/ready", b"/nosuch.stp", b"/../good.stp", b"/%2e%2e%2fgood.stp", b"*",
         b"http://127.0.0.1/good.stp", b"/good.stp?x=1#frag", b"/%zz.stp", b"//good.stp",
         b"/good.stp%00", b"/\xff.stp", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1",
            b"HTTP/1.10", b"HTTP/", b"", b"HTTP/1.1\x00"]
HEADER_NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection",
                b"Accept-Encoding", b"Accept", b"X-Prometheus-Scrape-Timeout-Seconds",
                b"Authorization", b"Expect", b"Range", b"If-None-Match", b"X"]
HEADER_VALUES = [b"x", b"0", b"-1", b"1000000000000", b"chunked", b"close", b"keep-alive",
                 b"gzip", b"gzip;q=0", b"text/html", b"nan", b"1e400", b"0.01", b"100-continue",
                 b"Basic !!!", b"bytes=0-1", b"", b"\xff\xfe", b"a" * 300, b"1_0", b"+5"]


@st.composite
def http_request(draw):
    method = draw(st.sampled_from(METHODS) | st.binary(max_size=12))
    path = draw(st.sampled_from(PATHS) | st.binary(max_size=64).map(lambda b: b"/" + b))
    version = draw(st.sampled_from(VERSIONS))
    eol = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n"]))
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES) | st.binary(max_size=20),
                                      st.sampled_from(HEADER_VALUES) | st.binary(max_size=40)),
                            max_size=8))
    sep = draw(st.sampled_from([b": ", b":", b" : ", b"", b":\t"]))
    body = draw(st.binary(max_size=64))
    parts = [b" ".join(p for p in (method, path, version) if p or draw(st.booleans()))]
    parts += [k + sep + v for k, v in headers]
    if draw(st.integers(0, 9)) == 0:
        # Around the header-count limit (100).
        parts += [b"X-F%d: v" % i for i in range(draw(st.integers(95, 105)))]
    raw = eol.join(parts) + eol + eol + body
    # Mutations: flip, insert, delete, duplicate, truncate.
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate", "none"]))
        if not raw:
            break
        i = draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        elif kind == "insert":
            raw = raw[:i] + draw(st.binary(min_size=1, max_size=16)) + raw[i:]
        elif kind == "delete":
            raw = raw[:i] + raw[i + 1:]
        elif kind == "dup":
            raw = raw + raw[:i]
        elif kind == "truncate":
            raw = raw[:i]
    return raw


requests = (st.binary(max_size=2048)
            | http_request()
            | st.lists(http_request(), min_size=2, max_size=3).map(b"".join))


@settings(max_examples=int(os.environ.get("STAPEXP_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=requests)
def test_fuzz_http(fuzz_exporter, data):
    response, took = send(fuzz_exporter, data)
    check_response(response, data)
    assert fuzz_exporter.proc.poll() is None, "the exporter died"


def tracebacks(lines):
    """The traceback blocks in a log: 'Traceback ...', indented lines, and the
    exception line."""
    blocks, current = [], None
    for line in lines:
        if line.startswith("Traceback (most recent call last):"):
            current = [line]
        elif current is not None:
            current.append(line)
            if not line.startswith(" "):
                blocks.append("\n".join(current))
                current = None
    if current:
        blocks.append("\n".join(current))
    return blocks


def test_after_fuzzing_the_exporter_is_healthy(fuzz_exporter):
    exp = fuzz_exporter
    assert exp.proc.poll() is None
    assert exp.get("/good.stp").status == 200
    assert exp.get("/-/healthy").status == 200
    text = exp.log_text()
    found = tracebacks(exp.log_lines)
    assert not found, "\n\n".join(found[:3])
    assert not re.search(r'" 500 ', text)
    assert "canary-fuzz-31c7" not in text
    assert "\x1b" not in text and "\r" not in text
