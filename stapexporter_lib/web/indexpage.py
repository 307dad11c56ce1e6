"""The index page (``GET /``): the operator's first look at a host.

Renders rows the app gathered (``ScriptRow``) as a plain-text table for
terminals (``curl /``) or as one self-contained HTML page: inline CSS that
reads on a phone (one card per script) and on a wide screen (a table), no
external assets, no JavaScript.

Every text that comes from outside the code (script file names, stderr
lines, error messages, the directory) goes through ``logs.escape_line`` first:
a file named with ESC sequences must not retitle or recolour the terminal of
whoever runs ``curl /``.

Owns the index page's text and HTML.  Must not read files, start scripts
or change sessions (``app.py`` hands it the rows).
"""

import html
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import quote

from ..logs import escape_line

_KIB = 1024.0
_MINUTE = 60
_HOUR = 3600
_DAY = 86400


class ScriptRow(NamedTuple):
    """What the index shows about one script (None: not applicable)."""

    name: str
    state: str
    pid: Optional[int]
    uptime: Optional[float]        # seconds
    starts: int
    scraped_ago: Optional[float]   # seconds since the last request for it
    output_bytes: int              # last output read (0: none yet)
    output_read: bool              # the current run's output has been read
    cpu_seconds: Optional[float]   # the running process group's CPU time
    resident_bytes: Optional[int]  # the running process group's memory
    last_error: Optional[str]      # for refused and backoff: the reason
    stderr_tail: Sequence[str]     # shown only with an error
    retry_in: Optional[float] = None  # backoff, refused autostart: next try in (s)
    queued: bool = False           # its start waits its turn under --max-starting
    settings: str = ""             # in effect: "keepalive=600 autostart=yes ..."
    edit_error: Optional[str] = None  # why the last edit of the file did not take over
    edit_stderr: Sequence[str] = ()   # and its last lines of standard error
    probe_share: Optional[float] = None  # its BPF programs' run time, a share of a CPU
    kernel_bytes: Optional[int] = None   # its BPF programs' and maps' memory, or module's
    series: Optional[int] = None   # samples in its last output read


class Page(NamedTuple):
    """The whole index."""

    version: str
    directory: str
    error: Optional[str]           # the scripts directory could not be read
    rows: List[ScriptRow]


# -- formatting ---------------------------------------------------------------

def duration(seconds: Optional[float]) -> str:
    """42s, 5m03s, 2h05m, 3d04h; '-' for None."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < _MINUTE:
        return "%ds" % s
    if s < _HOUR:
        return "%dm%02ds" % (s // _MINUTE, s % _MINUTE)
    if s < _DAY:
        return "%dh%02dm" % (s // _HOUR, s % _HOUR // _MINUTE)
    return "%dd%02dh" % (s // _DAY, s % _DAY // _HOUR)


def size(nbytes: Optional[int]) -> str:
    """512B, 1.2KiB, 3.4MiB; '-' for None."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < _KIB or unit == "GiB":
            return "%d%s" % (value, unit) if unit == "B" else "%.1f%s" % (value, unit)
        value /= _KIB
    return "-"  # not reached


def cpu(seconds: Optional[float]) -> str:
    return "-" if seconds is None else "%.2fs" % seconds


def share(fraction: Optional[float]) -> str:
    """A share of a CPU as a percentage: 0.25%; '-' for None."""
    return "-" if fraction is None else "%.2f%%" % (fraction * 100)


def output_cell(row: ScriptRow) -> str:
    """The last output's size; ``unread`` while the running process's output
    exists but no request has read it yet."""
    if row.pid and row.state == "running" and not row.output_read:
        return "unread"
    return size(row.output_bytes) if row.output_bytes else "-"


def reason(row: ScriptRow) -> str:
    """The last error (for ``refused`` and ``backoff``: why), with when the
    next try comes, or that the start is queued, or why an edit did not take
    over; '-' for none."""
    text = row.last_error or row.edit_error or ""
    if row.queued:
        text = "queued: starts when a --max-starting slot frees"
    if row.retry_in is not None:
        then = "restarting" if row.state == "backoff" else "checking again"
        text = "%s (%s in %s)" % (text or row.state, then, duration(row.retry_in))
    return text or "-"


def _cells(row: ScriptRow) -> List[str]:
    """The table cells of ROW, each one word (the text table splits on blanks)."""
    return [escape_line(row.name), row.state, str(row.pid) if row.pid else "-",
            duration(row.uptime), str(row.starts), duration(row.scraped_ago),
            output_cell(row), cpu(row.cpu_seconds), size(row.resident_bytes),
            share(row.probe_share), size(row.kernel_bytes),
            "-" if row.series is None else str(row.series),
            ",".join(row.settings.split()) or "-"]


def _stderr_sections(row: ScriptRow) -> List[Tuple[str, Sequence[str]]]:
    """(what, lines) of the standard error shown below ROW: its last run's
    with an error, the last edit's that did not take over."""
    sections = []
    if row.last_error and row.stderr_tail:
        sections.append(("last lines of standard error", row.stderr_tail))
    if row.edit_error and row.edit_stderr:
        sections.append(("the edited version's last lines of standard error", row.edit_stderr))
    return sections


HEADER = ("SCRIPT", "STATE", "PID", "UPTIME", "STARTS", "SCRAPED", "OUTPUT", "CPU", "MEMORY",
          "PROBE", "KMEM", "SERIES", "SETTINGS", "LAST ERROR")
LINKS = ("/NAME.stp", "/metrics", "/targets", "/-/healthy", "/-/ready")


# -- plain text ---------------------------------------------------------------

def render_text(page: Page) -> bytes:
    """A table for terminals; stderr tails of failed scripts below it."""
    lines = ["stap-exporter %s: %d scripts in %s" % (
        page.version, len(page.rows), escape_line(page.directory))]
    if page.error:
        lines.append("error: " + escape_line(page.error))
    table = [list(HEADER[:-1])] + [_cells(r) for r in page.rows]
    last = [HEADER[-1]] + [escape_line(reason(r)) for r in page.rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER) - 1)]
    for cells, tail in zip(table, last):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + tail)
    for row in page.rows:
        for what, tail in _stderr_sections(row):
            lines.append("")
            lines.append("%s: %s:" % (escape_line(row.name), what))
            lines.extend("  " + escape_line(line) for line in tail)
    lines.append("")
    lines.append("Endpoints: %s (HTML: ask with Accept: text/html)" % ", ".join(LINKS))
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


# -- HTML ---------------------------------------------------------------------

_CSS = """
:root{color-scheme:light dark;--fg:#1d2125;--muted:#5f6b76;--bg:#fff;--line:#d9dee3;
--head:#f3f5f7;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--idle:#57606a}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9aa5b1;--bg:#0d1117;
--line:#30363d;--head:#161b22;--ok:#3fb950;--warn:#d29922;--bad:#f85149;--idle:#8b949e}}
*{box-sizing:border-box}
body{margin:0;padding:1rem;font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;
color:var(--fg);background:var(--bg)}
h1{font-size:1.3rem;margin:0 0 .25rem}h1 small{color:var(--muted);font-weight:400}
header p,nav{margin:.25rem 0;color:var(--muted)}nav a{margin-right:.9rem}
a{color:inherit}code{font-size:.9em;word-break:break-all}
.error{color:var(--bad);font-weight:600}
table{border-collapse:collapse;width:100%;margin-top:.75rem}
th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{background:var(--head);font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{word-break:break-all;font-weight:600}
.state{display:inline-block;padding:0 .5rem;border-radius:1rem;border:1px solid;
font-size:.85em;white-space:nowrap}
.running{color:var(--ok)}.starting,.stopping,.backoff{color:var(--warn)}
.failed,.refused{color:var(--bad)}.stopped{color:var(--idle)}
pre{margin:.3rem 0 0;padding:.4rem;background:var(--head);white-space:pre-wrap;
word-break:break-all;font-size:.85em;max-height:16rem;overflow:auto}
details summary{cursor:pointer;color:var(--muted)}
@media (max-width:760px){
thead{display:none}table,tbody{display:block}
tr{display:grid;grid-template-columns:1fr 1fr;column-gap:1rem;border:1px solid var(--line);
border-radius:.5rem;margin:0 0 .75rem;padding:.35rem .2rem}
td{border:0;padding:.15rem .5rem;display:flex;justify-content:space-between;gap:.5rem;
align-items:baseline}
td::before{content:attr(data-label);color:var(--muted);font-weight:400}
td.name::before,td.na{display:none}td.name{grid-column:1;font-size:1.05em}
td.err{grid-column:1/-1;display:block}td.err::before{display:block}td.err.na{display:none}}
"""

_COLUMNS = (("script", "name"), ("state", ""), ("pid", "num"), ("uptime", "num"),
            ("starts", "num"), ("last scrape", "num"), ("output", "num"), ("CPU", "num"),
            ("memory", "num"), ("probe", "num"), ("kernel memory", "num"), ("series", "num"),
            ("settings", "settings"), ("last error", "err"))


def _h(text: str) -> str:
    return html.escape(escape_line(text))


def _td(label: str, css: str, content: str) -> str:
    """A cell; one without a value is marked ``na`` (left out on a phone)."""
    css = (css + " na").strip() if content == "-" else css
    return '<td data-label="%s"%s>%s</td>' % (label, ' class="%s"' % css if css else "",
                                             content)


def _html_row(row: ScriptRow) -> str:
    cells = _cells(row)
    ago = "-" if row.scraped_ago is None else duration(row.scraped_ago) + " ago"
    error = reason(row)
    error = _h(error) if error != "-" else error
    for what, tail in _stderr_sections(row):
        error += ("<details><summary>%s</summary><pre>%s</pre></details>"
                  % (what, _h("\n".join(tail))))
    href = html.escape(quote(row.name, safe="", errors="surrogateescape"))
    contents = ['<a href="%s">%s</a>' % (href, _h(row.name)),
                '<span class="state %s">%s</span>' % (row.state, _h(row.state)),
                *cells[2:5], ago, *cells[6:12], _h(row.settings) or "-", error]
    return '<tr class="script-row">%s</tr>' % ("".join(
        _td(label, css, content) for (label, css), content in zip(_COLUMNS, contents)))


def render_html(page: Page, now: Optional[float] = None) -> bytes:
    """One self-contained page: a table that turns into cards on a phone."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))
    out = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>stap-exporter</title><style>%s</style></head><body>" % _CSS,
           "<header><h1>stap-exporter <small>%s</small></h1>" % _h(page.version),
           "<p>%d scripts in <code>%s</code> &middot; %s</p>" % (
               len(page.rows), _h(page.directory), html.escape(stamp)),
           '<nav><a href="metrics">/metrics</a><a href="targets">/targets</a>'
           '<a href="-/healthy">/-/healthy</a><a href="-/ready">/-/ready</a></nav></header>']
    if page.error:
        out.append('<p class="error">error: %s</p>' % _h(page.error))
    out.append("<main><table><thead><tr>%s</tr></thead><tbody>" % "".join(
        "<th>%s</th>" % label for label, _ in _COLUMNS))
    out.extend(_html_row(row) for row in page.rows)
    out.append("</tbody></table></main></body></html>\n")
    return "\n".join(out).encode("utf-8", "replace")
