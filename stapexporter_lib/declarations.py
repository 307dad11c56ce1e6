"""Typed metrics from untyped scripts.

The prometheus.stpm tapset never emits ``# HELP`` or ``# TYPE``.  A script may
declare them in comments, which systemtap ignores::

    // prometheus: TYPE count counter
    // prometheus: HELP count read() calls per thread and CPU

(``#`` comments work too.)  The exporter then inserts the declared lines
before the first sample of each family, unless the output already has a
``# TYPE`` line for it.
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


class Annotator:
    """Inserts declared HELP/TYPE lines into one script's output."""

    def __init__(self, decls: Dict[str, Tuple[Optional[str], Optional[str]]]):
        self.decls = decls
        self._sample_to_family = {}
        self._header = {}
        for family, (typ, help_text) in decls.items():
            for suffix in _SUFFIXES.get(typ, ("",)):
                self._sample_to_family[family + suffix] = family
            lines = []
            if help_text:
                lines.append("# HELP %s %s\n" % (family, _escape_help(help_text)))
            if typ:
                lines.append("# TYPE %s %s\n" % (family, typ))
            self._header[family] = "".join(lines).encode("utf-8")
        names = sorted(self._sample_to_family, key=len, reverse=True)
        self._sample_re = re.compile(
            rb"^(" + b"|".join(re.escape(n.encode()) for n in names) + rb")(?=[{ \t])",
            re.M) if names else None

    def __bool__(self):
        return self._sample_re is not None

    def annotate(self, body: bytes) -> bytes:
        if self._sample_re is None:
            return body
        pending = {f for f in self.decls if b"# TYPE " + f.encode() + b" " not in body}
        if not pending:
            return body
        out = []
        pos = 0
        for m in self._sample_re.finditer(body):
            family = self._sample_to_family[m.group(1).decode()]
            if family in pending:
                pending.discard(family)
                out.append(body[pos:m.start()])
                out.append(self._header[family])
                pos = m.start()
                if not pending:
                    break
        out.append(body[pos:])
        return b"".join(out)
