"""Logging set-up: one line per event, control characters escaped so that
nothing a client or a script sends can forge a log line."""

import logging
import sys

from .session import escape_line

log = logging.getLogger("stap-exporter")


class EscapingFormatter(logging.Formatter):
    """Escapes the message; tracebacks (ours) keep their line breaks."""

    def formatMessage(self, record):
        record.message = escape_line(record.message)
        return super().formatMessage(record)


def setup_logging(level: str, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EscapingFormatter(
        "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
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
