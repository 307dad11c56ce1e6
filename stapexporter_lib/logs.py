"""Logging: one line per event, in logfmt or JSON, that nothing a client or a
script sends can forge.

Owns the formatters, the escaping of text for logs and terminals
(``escape_line``), the ``event()`` helper and ``Throttle``; it must not import
any other module of the package (everything imports it).

Where the structure of a line comes from -- never from the rendered text:

* the event name: ``extra={"event": ...}`` (what ``event()`` passes), else the
  code-controlled prefix of the *format string* (``"spawned: ..."``);
* the fields: ``extra={"fields": {...}}`` (and ``script``/``pid`` extras),
  else the ``key=%s`` conversions of the format string, paired with their
  arguments (so ``"exited: script=%s pid=%d (%s)"`` gives ``script`` and
  ``pid`` whatever the arguments contain);
* the free text: everything else, written as one quoted ``msg="..."`` value in
  logfmt and as the ``msg`` member in JSON.

Field values and the free text are escaped: C0 and C1 control characters,
DEL and U+2028/U+2029 become ``\\xNN``/``\\uNNNN``; in logfmt a value with a
space, ``=``, ``"`` or ``\\`` is quoted, so no text can add a key or a line.
"""

import functools
import json
import logging
import re
import sys
import time
from typing import List, Optional, Tuple

log = logging.getLogger("stap-exporter")

# Characters a terminal or a line-based log reader acts on: C0, DEL and C1
# controls, the Unicode line and paragraph separators (line breaks to some
# readers), and the bidirectional controls that reorder what a reader sees
# without changing the bytes ("Trojan Source", CVE-2021-42574): a script's
# name or output must not make one line look like another.
_CONTROLS = list(range(0x20)) + [0x7f] + list(range(0x80, 0xa0))
_UNICODE_CONTROLS = [0x2028, 0x2029, 0x061c, 0x200e, 0x200f] + list(range(0x202a, 0x202f)) \
    + list(range(0x2066, 0x206a))
ESCAPES = {c: "\\x%02x" % c for c in _CONTROLS}
ESCAPES.update({c: "\\u%04x" % c for c in _UNICODE_CONTROLS})
# Inside a quoted logfmt value, also the quote and the escape character.
_QUOTE_ESCAPES = dict(ESCAPES)
_QUOTE_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"'})
_BARE_VALUE_RE = re.compile(r'^[^\s="\\]+$')

_PREFIX_RE = re.compile(r"^([a-z][a-z0-9_-]*): ")
_EVENT_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_KEY_RE = re.compile(r"(?:^| )([a-z_][a-z0-9_]*)=$")
_SPEC_RE = re.compile(r"%(?:%|[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[diouxXeEfFgGcrsa])")
_RESERVED = frozenset(("ts", "level", "event", "msg", "traceback"))
# Conversions whose int arguments stay numbers in JSON ("pid=%s" given 12).
_INT_SPECS = ("d", "i", "u", "s")

# What a record carries when a line has no event of its own.
DEFAULT_EVENT = "log"
# A repeatable refusal is logged at most once per this many seconds.
THROTTLE_INTERVAL = 10.0


def escape_line(text: str, keep_newlines: bool = False) -> str:
    """TEXT with control characters (C0, DEL, C1), the Unicode line and
    paragraph separators and the bidirectional controls as escapes, so it is
    one line that cannot forge log lines, drive a terminal or reorder text
    (with KEEP_NEWLINES, line feeds are kept: a multi-line message for a
    page, each line escaped)."""
    if keep_newlines:
        return "\n".join(line.translate(ESCAPES) for line in text.split("\n"))
    return text.translate(ESCAPES)


def quote(value: str) -> str:
    """VALUE as a logfmt value: bare when that is unambiguous, else quoted
    with ``\\\\``, ``\\"`` and control characters escaped."""
    if _BARE_VALUE_RE.match(value) and value.translate(ESCAPES) == value:
        return value
    return '"%s"' % value.translate(_QUOTE_ESCAPES)


def event(logger: logging.Logger, level: int, name: str, text: str = "", *args,
          **fields) -> None:
    """Log event NAME with FIELDS (key=value; names from the code) and free
    TEXT (a %-format with ARGS).  Neither TEXT nor the field values can add a
    key: the formatters take the structure from here."""
    if not _EVENT_NAME_RE.match(name):
        raise ValueError("bad event name %r" % name)
    if logger.isEnabledFor(level):
        logger.log(level, text, *args, extra={"event": name, "fields": fields})


class Throttle:
    """Limits a recurring log line (a refusal an attacker can repeat) to one
    per INTERVAL seconds; ``allow()`` says how many were left out since."""

    def __init__(self, interval: float = THROTTLE_INTERVAL, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._next = float("-inf")
        self._skipped = 0

    def allow(self) -> Optional[int]:
        """None when this occurrence is not to be logged, else the number of
        occurrences not logged since the last one that was."""
        now = self.clock()
        if now < self._next:
            self._skipped += 1
            return None
        self._next = now + self.interval
        skipped, self._skipped = self._skipped, 0
        return skipped

    def event(self, logger: logging.Logger, level: int, name: str, text: str, *args,
              **fields) -> None:
        """``event()``, unless one went out less than INTERVAL ago; the next
        one that goes out says how many were left out."""
        skipped = self.allow()
        if skipped is not None:
            event(logger, level, name, text + "%s", *args,
                  " (and %d more not logged)" % skipped if skipped else "", **fields)


# -- taking a record apart -------------------------------------------------------

Field = Tuple[str, object, bool]  # name, value, is an integer


@functools.lru_cache(maxsize=512)
def _template(fmt: str):
    """Parse a %-format string from the code into (event, pieces): pieces is
    a list of ("text", literal) and ("arg", spec, key or None) in order.
    Returns None when the format cannot be paired with positional args."""
    m = _PREFIX_RE.match(fmt)
    event_name = m.group(1) if m else None
    rest = fmt[m.end():] if m else fmt
    pieces: List[tuple] = []
    pos = 0
    for spec in _SPEC_RE.finditer(rest):
        literal = rest[pos:spec.start()]
        pos = spec.end()
        if spec.group() == "%%":
            pieces.append(("text", literal + "%"))
            continue
        if "*" in spec.group():
            return None
        key_m = _KEY_RE.search(literal)
        key = key_m.group(1) if key_m and key_m.group(1) not in _RESERVED else None
        if key is not None:
            literal = literal[:key_m.start()]
        pieces.append(("text", literal))
        pieces.append(("arg", spec.group(), key))
    pieces.append(("text", rest[pos:]))
    # A keyed value must end at a space or the end: "n=%ds" is text.
    for i, piece in enumerate(pieces):
        if piece[0] == "arg" and piece[2] is not None:
            following = pieces[i + 1][1] if i + 1 < len(pieces) else ""
            if following and not following.startswith(" "):
                pieces[i] = ("arg", piece[1], None)
    return event_name, pieces


def structure(record: logging.LogRecord) -> Tuple[str, List[Field], str]:
    """(event, fields, free text) of RECORD, the structure taken from the
    code (extras or the format string), never from the rendered text."""
    if getattr(record, "event", None):
        fields = [(k, v, isinstance(v, int)) for k, v in
                  (getattr(record, "fields", None) or {}).items()]
        for extra in ("script", "pid"):
            if extra in record.__dict__ and all(f[0] != extra for f in fields):
                value = record.__dict__[extra]
                fields.append((extra, value, isinstance(value, int)))
        return str(record.event), fields, record.getMessage()
    msg = record.msg
    parsed = _template(msg) if isinstance(msg, str) else None
    args = record.args
    if parsed is not None and isinstance(args, tuple) and \
            sum(p[0] == "arg" for p in parsed[1]) == len(args):
        try:
            return _render(parsed, args)
        except (TypeError, ValueError, OverflowError):
            pass
    text = record.getMessage()
    event_name = parsed[0] if parsed else None
    if event_name and text.startswith(event_name + ": "):
        text = text[len(event_name) + 2:]
    return event_name or DEFAULT_EVENT, [], text


def _render(parsed, args) -> Tuple[str, List[Field], str]:
    event_name, pieces = parsed
    fields: List[Field] = []
    text = []
    values = iter(args)
    for piece in pieces:
        if piece[0] == "text":
            text.append(piece[1])
            continue
        value = next(values)
        rendered = piece[1] % (value,)
        if piece[2] is None:
            text.append(rendered)
        else:
            is_int = piece[1][-1] in _INT_SPECS and isinstance(value, int) and \
                not isinstance(value, bool)
            fields.append((piece[2], int(value) if is_int else rendered, is_int))
    return event_name or DEFAULT_EVENT, fields, "".join(text).strip()


def _timestamp(record) -> str:
    """UTC, RFC 3339 with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
        ".%03dZ" % record.msecs


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=... event=... key=value... msg="..."``; tracebacks
    (ours) follow as they are."""

    def format(self, record):
        event_name, fields, text = structure(record)
        parts = ["ts=%s level=%s event=%s" % (_timestamp(record), record.levelname.lower(),
                                              quote(event_name))]
        for key, value, _ in fields:
            parts.append("%s=%s" % (key, quote(str(value))))
        if text:
            parts.append("msg=%s" % quote(text))
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, the fields, msg, and
    traceback for internal errors."""

    def format(self, record):
        event_name, fields, text = structure(record)
        obj = {"ts": _timestamp(record), "level": record.levelname.lower(),
               "event": escape_line(event_name)}
        for key, value, is_int in fields:
            if key not in _RESERVED:
                obj.setdefault(key, value if is_int else escape_line(str(value)))
        obj["msg"] = escape_line(text)
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
            event(log, logging.DEBUG, "access", "%s", line.rstrip("\n"))

    def flush(self) -> None:
        pass
