"""Logging set-up: one line per event, control characters escaped so that
nothing a client or a script sends can forge a log line.

Messages are written as ``EVENT: key=value ... free text``; the formatters
turn that into logfmt-style lines (``ts=... level=info event=spawned
script=a.stp pid=12 ...``) or JSON objects with ``script`` and ``pid`` fields.
"""

import json
import logging
import re
import sys
import time

from .session import escape_line

log = logging.getLogger("stap-exporter")

FORMATS = ("logfmt", "json")

_EVENT_RE = re.compile(r"^([a-z][a-z_-]*): (.*)$", re.S)
_FIELD_RE = re.compile(r"\b(script|pid)=(\S+)")


def _split(message: str):
    m = _EVENT_RE.match(message)
    return (m.group(1), m.group(2)) if m else ("log", message)


def _timestamp(record) -> str:
    """UTC, RFC 3339 with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
        ".%03dZ" % record.msecs


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=... event=... rest``; tracebacks (ours) follow as is."""

    def format(self, record):
        event, rest = _split(escape_line(record.getMessage()))
        line = "ts=%s level=%s event=%s %s" % (_timestamp(record), record.levelname.lower(),
                                               event, rest)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, script, pid, msg."""

    def format(self, record):
        event, rest = _split(record.getMessage())
        obj = {"ts": _timestamp(record), "level": record.levelname.lower(), "event": event}
        for key, value in _FIELD_RE.findall(rest):
            obj.setdefault(key, int(value) if key == "pid" and value.isdigit() else value)
        obj["msg"] = rest
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=True)


def setup_logging(level: str, fmt: str = "logfmt", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


class AccessLog:
    """File-like sink for pywsgi's access log: request lines at DEBUG."""

    def write(self, line: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("access: %s", line.rstrip("\n"))

    def flush(self) -> None:
        pass
