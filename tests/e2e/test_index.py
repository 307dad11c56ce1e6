"""The index page: the text table for terminals (every control character
escaped), the HTML page, and that page rendered by a real
headless browser (Debian's chromium) at a phone's and a desktop's width."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import write_script
from stapexporter_lib import logs
from stapexporter_lib.web import indexpage

ESC_NAME = "\x1b]0;OWNED\x07x.stp"
# What a hostile script prints on stderr: ESC, BEL, CSI as C1 (U+009B), NEL
# (U+0085), the Unicode line separator, DEL.
HOSTILE_STDERR = "\x1b[31mRED\x07\u009b2J\u0085\u2028\x7fend"
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
CHROMIUM_TIMEOUT = 90


def test_escape_line_escapes_c0_c1_del_and_separators():
    assert logs.escape_line(HOSTILE_STDERR) == \
        "\\x1b[31mRED\\x07\\x9b2J\\x85\\u2028\\x7fend"
    assert logs.escape_line("plain ünïcode ✓") == "plain ünïcode ✓"
    assert not RAW_CONTROLS.search(logs.escape_line("".join(map(chr, range(0xa0)))))


def test_sizes_and_durations():
    assert [indexpage.size(n) for n in (None, 0, 1023, 1536, 5 * 2 ** 20, 3 * 2 ** 40)] == \
        ["-", "0B", "1023B", "1.5KiB", "5.0MiB", "3072.0GiB"]
    assert [indexpage.duration(s) for s in (None, 5, 65, 3 * 3600 + 120, 2 * 86400 + 7200)] == \
        ["-", "5s", "1m05s", "3h02m", "2d02h"]


def hostile_scripts(scripts):
    write_script(scripts, ESC_NAME, "fail")
    path = write_script(scripts, "loud.stp", "fail")
    with open(path, "a") as f:  # fakestap prints these bytes on stderr at start
        f.write("# fake: stderr_hex=%s\n" % HOSTILE_STDERR.encode("utf-8").hex())
    write_script(scripts, "quick.stp")


def test_escape_line_escapes_bidirectional_controls():
    """A name cannot reorder what a reader sees ("Trojan Source")."""
    bidi = "\u061c\u200e\u200f" + "".join(map(chr, range(0x202a, 0x202f))) \
        + "".join(map(chr, range(0x2066, 0x206a)))
    escaped = logs.escape_line("evil" + bidi + "txt.stp")
    assert escaped == "evil" + "".join("\\u%04x" % ord(c) for c in bidi) + "txt.stp"
    assert logs.escape_line(bidi) == escaped[4:-7]


def test_text_index_escapes_every_control_character(dirs, exporter_factory):
    scripts, _ = dirs
    hostile_scripts(scripts)
    exp = exporter_factory()
    exp.get_until("/quick.stp")
    failure = exp.get_until("/loud.stp", 502).text  # quotes the script's stderr
    assert "\\x1b[31mRED" in failure and not RAW_CONTROLS.search(failure), failure
    exp.get_until("/" + ESC_NAME.replace("\x1b", "%1B").replace("\x07", "%07"), 502)
    r = exp.get("/")
    assert r.status == 200 and r.header("Content-Type").startswith("text/plain")
    text = r.body.decode("utf-8")
    assert not RAW_CONTROLS.search(text), [m.group() for m in RAW_CONTROLS.finditer(text)]
    assert "\\x1b]0;OWNED\\x07x.stp" in text
    assert "\\x1b[31mRED\\x07\\x9b2J\\x85\\u2028\\x7fend" in text
    rows = {line.split()[0]: line.split() for line in text.split("\n\n")[0].splitlines()[2:]}
    assert rows["quick.stp"][1] == "running" and rows["quick.stp"][6].endswith("B")
    assert rows["loud.stp"][-3:] == ["exit", "status", "1"]
    assert "Endpoints: /NAME.stp, /metrics, /targets" in text
    html = exp.get("/", headers={"Accept": "text/html"}).body.decode("utf-8")
    assert not RAW_CONTROLS.search(html)
    assert '<a href="%1B%5D0%3BOWNED%07x.stp">\\x1b]0;OWNED\\x07x.stp</a>' in html


def test_html_index_has_every_field_and_link(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    write_script(scripts, "broken.stp", "fail")
    exp = exporter_factory()
    exp.get_until("/quick.stp")
    exp.get_until("/broken.stp", 502)
    r = exp.get("/", headers={"Accept": "text/html"})
    assert r.header("Content-Type").startswith("text/html")
    page = r.text
    for label in ("state", "pid", "uptime", "starts", "last scrape", "output", "CPU", "memory",
                  "last error"):
        assert "<th>%s</th>" % label in page
    for link in ('href="metrics"', 'href="targets"', 'href="quick.stp"'):
        assert link in page
    assert '<meta name="viewport"' in page and "@media (max-width:" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<pre>semantic error: fake failure in broken.stp" in page


def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (Debian package: chromium; tools/install-deps)")
    return path


def browse(browser, tmp_path, url, *args):
    """Run headless chromium with a fresh profile; its stdout."""
    profile = tmp_path / ("profile%d" % len(os.listdir(str(tmp_path))))
    proc = subprocess.run([browser] + CHROMIUM_FLAGS + ["--user-data-dir=%s" % profile]
                          + list(args) + [url], capture_output=True, timeout=CHROMIUM_TIMEOUT,
                          stdin=subprocess.DEVNULL, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.decode("utf-8", "replace")


@pytest.mark.parametrize("width,height", [(390, 1400), (1280, 800)])
def test_browser_renders_the_index(dirs, exporter_factory, tmp_path, width, height):
    browser = chromium()
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    write_script(scripts, "broken.stp", "fail")
    write_script(scripts, "idle.stp")
    exp = exporter_factory()
    exp.get_until("/quick.stp")
    exp.get_until("/broken.stp", 502)
    url = "http://127.0.0.1:%d/" % exp.port
    size = "--window-size=%d,%d" % (width, height)
    shot = tmp_path / ("index-%dx%d.png" % (width, height))
    browse(browser, tmp_path, url, size, "--screenshot=%s" % shot)
    with open(str(shot), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    dom = browse(browser, tmp_path, url, size, "--dump-dom")
    rows = re.findall(r'<tr class="script-row">(.*?)</tr>', dom, re.S)
    states = {re.search(r'href="([^"]+)"', row).group(1):
              re.search(r'class="state (\w+)"', row).group(1) for row in rows}
    assert states == {"broken.stp": "stopped", "idle.stp": "stopped", "quick.stp": "running"}
    assert "exit status 1" in dom
