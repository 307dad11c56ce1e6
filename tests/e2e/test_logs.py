"""Log lines cannot be forged: the structure of a line
comes from the code, user-controlled text is quoted, and C0/C1 controls and
U+2028/U+2029 and the bidirectional controls are escaped.  End to end against the daemon, then the
formatters in-process."""

import io
import json
import logging
import re
import socket

import pytest

from conftest import write_script

from stapexporter_lib import logs

FORGED = b"script=forged.stp pid=1 level=error event=exited"


def parse_logfmt(line):
    """KEY=VALUE pairs of a logfmt line, in order (quoted values unescaped)."""
    pairs = []
    for m in re.finditer(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?=\s|$)', line):
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r'\\(.)', r'\1', value[1:-1])
        pairs.append((m.group(1), value))
    rebuilt = " ".join("%s=%s" % kv for kv in pairs)
    assert len(rebuilt) <= len(line), line
    return pairs


def _send(exp, data):
    with socket.create_connection((exp.host, exp.port), timeout=5) as s:
        s.sendall(data)
        s.settimeout(5)
        while s.recv(65536):
            pass


def _attack(exp):
    # A header line that is not a header, a request line with C1 controls
    # (latin-1 bytes 0x85 and 0x9b), and a script whose stderr has ESC and CSI.
    _send(exp, b"GET / HTTP/1.1\r\nHost: x\r\n" + FORGED + b"\r\n\r\n")
    _send(exp, b"GET /a\x85b\x9bc.stp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert exp.get_until("/talk.stp").status == 200


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_client_and_script_text_cannot_forge_log_fields(dirs, exporter_factory, fmt):
    scripts, _ = dirs
    write_script(scripts, "talk.stp", "stderr=\x1b[2Jlevel=error_event=forged_\u009b\u202e")
    exp = exporter_factory(["--log-format", fmt])
    _attack(exp)
    bad_header = exp.wait_log(r"Invalid header line")
    c1_access = exp.wait_log(r"GET /a.*b.*c\.stp")
    stderr = exp.wait_log(r"event.*stderr.*forged")
    text = exp.log_text()
    for raw in ("\x1b", "\x85", "\x9b", "\u2028", "\u202e"):
        assert raw not in text, "raw %r in the log" % raw
    if fmt == "json":
        obj = json.loads(bad_header)
        assert obj["level"] == "info" and obj["event"] == "http"
        assert "script" not in obj and "pid" not in obj, obj
        assert FORGED.decode() in obj["msg"]
        assert "\\x85" in json.loads(c1_access)["msg"]
        talk = json.loads(stderr)
        assert talk["event"] == "stderr" and talk["script"] == "talk.stp"
        assert isinstance(talk["pid"], int) and talk["level"] == "info"
        for raw in text.splitlines():
            json.loads(raw)
        return
    pairs = parse_logfmt(bad_header)
    assert [k for k, _ in pairs] == ["ts", "level", "event", "client", "msg"], pairs
    assert dict(pairs)["level"] == "info"
    assert FORGED.decode() in dict(pairs)["msg"]
    assert "\\x85" in dict(parse_logfmt(c1_access))["msg"]
    talk = parse_logfmt(stderr)
    assert [k for k, _ in talk] == ["ts", "level", "event", "script", "pid", "msg"], talk
    assert dict(talk)["level"] == "info" and dict(talk)["script"] == "talk.stp"


def _format(fmt, *args, formatter=None, **kw):
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(formatter or logs.LogfmtFormatter())
    logger = logging.getLogger("stap-exporter.test-logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    if kw:
        logs.event(logger, logging.INFO, fmt, *args, **kw)
    else:
        logger.info(fmt, *args)
    return buf.getvalue().rstrip("\n")


def test_fields_come_from_the_format_string_not_the_text():
    line = _format("exited: script=%s pid=%d (%s; not expected)", "a b.stp", 12,
                   'x" level=error\u2028\u0085\u009b\\')
    assert [k for k, _ in parse_logfmt(line)] == ["ts", "level", "event", "script", "pid",
                                                  "msg"], line
    assert line.endswith(' level=info event=exited script="a b.stp" pid=12'
                         ' msg="(x\\" level=error\\u2028\\x85\\x9b\\\\; not expected)"'), line
    assert "\u2028" not in line and "\u0085" not in line and "\n" not in line


def test_event_helper_and_json():
    line = _format("auth", "denied %s", "it", formatter=logs.JsonFormatter(),
                   client="1.2.3.4:5", user='ev"il\u2029')
    obj = json.loads(line)
    assert obj["event"] == "auth" and obj["client"] == "1.2.3.4:5"
    assert obj["user"] == 'ev"il\\u2029' and obj["msg"] == "denied it"
    assert "\u2029" not in line
    with pytest.raises(ValueError):
        logs.event(logging.getLogger("x"), logging.INFO, "bad name=x")


def test_escape_line_covers_c0_c1_and_separators():
    assert logs.escape_line("a\x00\x1b\x7f\x80\x85\x9b\x9f\u2028\u2029\u00a0b") == \
        "a\\x00\\x1b\\x7f\\x80\\x85\\x9b\\x9f\\u2028\\u2029\u00a0b"


def test_throttle_counts_what_it_left_out():
    now = [0.0]
    t = logs.Throttle(10.0, clock=lambda: now[0])
    assert t.allow() == 0
    assert t.allow() is None and t.allow() is None
    now[0] = 10.0
    assert t.allow() == 2
