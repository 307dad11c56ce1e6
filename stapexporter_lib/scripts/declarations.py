"""Typed metrics from untyped scripts.

The prometheus.stpm tapset never emits ``# HELP`` or ``# TYPE``.  A script may
declare them in comments, which systemtap ignores::

    // prometheus: TYPE count counter
    // prometheus: HELP count read() calls per thread and CPU

(``#`` comments work too.)  The exporter then inserts the declared lines
before the first sample of each family, unless the output already has a
``# TYPE`` line for it.

Owns the parsing of the declarations and their insertion.  Pure text: must
not touch files, processes or sessions.
"""

import re
from typing import Dict, Optional, Tuple

TYPES = ("counter", "gauge", "histogram", "summary", "untyped")

_DECL_RE = re.compile(r"^\s*(?://|#)\s*prometheus:\s*(TYPE|HELP)\s+([a-zA-Z_:][a-zA-Z0-9_:]*)"
                      r"(?:\s+(.*?))?\s*$")

# Sample names a family's samples may carry, by type.
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def parse_declarations(text: str) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
    """family -> (type or None, help or None), from a script's source."""
    decls: Dict[str, list] = {}
    for line in text.splitlines():
        m = _DECL_RE.match(line)
        if not m:
            continue
        kind, family, value = m.group(1), m.group(2), (m.group(3) or "")
        entry = decls.setdefault(family, [None, None])
        if kind == "TYPE":
            if value in TYPES:
                entry[0] = value
        elif value:
            entry[1] = value
    return {f: (t, h) for f, (t, h) in decls.items() if t or h}


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _declares(body: bytes, kind: bytes, family: str) -> bool:
    """True if BODY has a '# KIND FAMILY ...' line."""
    needle = b"# " + kind + b" " + family.encode() + b" "
    return body.startswith(needle) or (b"\n" + needle) in body


class Annotator:
    """Inserts declared HELP/TYPE lines into one script's output."""

    def __init__(self, decls: Dict[str, Tuple[Optional[str], Optional[str]]]):
        self.decls = decls
        self._sample_to_family = {}
        self._header = {}
        for family, (typ, help_text) in decls.items():
            for suffix in _SUFFIXES.get(typ, ("",)):
                self._sample_to_family[family + suffix] = family
            help_line = ("# HELP %s %s\n" % (family, _escape_help(help_text))).encode(
                "utf-8") if help_text else b""
            type_line = ("# TYPE %s %s\n" % (family, typ)).encode() if typ else b""
            self._header[family] = (help_line, type_line)
        names = sorted(self._sample_to_family, key=len, reverse=True)
        self._sample_re = re.compile(
            rb"^(" + b"|".join(re.escape(n.encode()) for n in names) + rb")(?=[{ \t])",
            re.M) if names else None

    def __bool__(self):
        return self._sample_re is not None

    def annotate(self, body: bytes) -> bytes:
        if self._sample_re is None:
            return body
        # What the output already declares itself is left alone.
        pending = {}
        for family, (help_line, type_line) in self._header.items():
            header = b""
            if help_line and not _declares(body, b"HELP", family):
                header += help_line
            if type_line and not _declares(body, b"TYPE", family):
                header += type_line
            if header:
                pending[family] = header
        if not pending:
            return body
        out = []
        pos = 0
        for m in self._sample_re.finditer(body):
            family = self._sample_to_family[m.group(1).decode()]
            header = pending.pop(family, None)
            if header is not None:
                out.append(body[pos:m.start()])
                out.append(header)
                pos = m.start()
                if not pending:
                    break
        out.append(body[pos:])
        return b"".join(out)
