"""The documentation agrees with the code: every docopt option is documented in
the man page and the README, the man page is clean roff, and the README's test
command is the one CI runs."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
MANPAGE = os.path.join(ROOT, "man", "stap-exporter.8")
README = os.path.join(ROOT, "README.md")
CI_RUN = os.path.join(ROOT, ".ci", "run")

TEST_COMMAND = "bash tools/install-deps && python3 -m pytest"

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stapexporter_lib import cli  # noqa: E402


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def usage_options():
    """Every option name (-p, --port, -c, ...) in the Options: section of the
    docopt usage text."""
    options_section = cli.USAGE.split("Options:", 1)[1]
    names = set()
    for line in options_section.splitlines():
        stripped = line.strip()
        if not stripped.startswith("-"):
            continue  # a continuation line of a description
        # The option spec ends at the first run of two spaces (docopt's rule).
        spec = re.split(r"\s{2,}", stripped, maxsplit=1)[0]
        for word in re.split(r"[\s,]+", spec):
            word = word.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*", word):
                names.add(word)
    return sorted(names)


def unroff(text):
    """Man page source with the escapes that matter for option names undone."""
    text = re.sub(r"\\f(?:[BIRP]|\(..|\[[^]]*\])", "", text)  # font changes
    text = text.replace("\\-", "-").replace("\\(hy", "-").replace("\\~", " ")
    text = text.replace("\\&", "").replace("\\c\n", "")
    return text


def mentions(text, option):
    """OPTION appears as a whole option name (--log not matching --log-level)."""
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(option), text) is not None


def test_usage_has_options():
    # Guards the parser above: if it found nothing, the checks below would be vacuous.
    options = usage_options()
    for expected in ("-p", "--port", "-k", "--keepalive", "-s", "--scripts", "-c",
                     "--check", "--help", "--version"):
        assert expected in options, options


@pytest.mark.parametrize("option", usage_options())
def test_option_in_manpage(option):
    assert mentions(unroff(read(MANPAGE)), option), \
        "option %s (from cli.USAGE) is not documented in man/stap-exporter.8" % option


@pytest.mark.parametrize("option", usage_options())
def test_option_in_readme(option):
    assert mentions(read(README), option), \
        "option %s (from cli.USAGE) is not documented in README.md" % option


def test_manpage_has_no_groff_warnings():
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (tools/install-deps installs groff-base)")
    proc = subprocess.run([groff, "-man", "-ww", "-z", MANPAGE], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)
    output = proc.stdout.decode("utf-8", "replace")
    assert output == "", "groff -man -ww -z man/stap-exporter.8 printed:\n" + output
    assert proc.returncode == 0


def test_readme_test_command_is_what_ci_runs():
    assert TEST_COMMAND in read(README)
    commands = [line.strip() for line in read(CI_RUN).splitlines()
                if line.strip() and not line.strip().startswith("#")]
    install = [i for i, c in enumerate(commands) if "tools/install-deps" in c]
    pytest_runs = [i for i, c in enumerate(commands)
                   if re.search(r"(^|\s)python3 -m pytest(\s|$)", c)]
    assert install, ".ci/run does not run tools/install-deps"
    assert pytest_runs, ".ci/run does not run python3 -m pytest"
    assert min(install) < max(pytest_runs), \
        ".ci/run must run python3 -m pytest after tools/install-deps"
    ci = read(CI_RUN)
    assert TEST_COMMAND in ci, ".ci/run must run README's test command as it is written"
    assert "STAP_EXPORTER_REQUIRE_REALSTAP=1" in ci
    # Once with Debian's python3 and packages, and the Debian package test.
    assert re.search(r"^PATH=\$DEBIAN_PATH suite$", ci, re.M) \
        and "DEBIAN_PATH=/usr/sbin:/usr/bin:/sbin:/bin" in ci, ci
    assert "STAP_EXPORTER_PACKAGE_TEST=1" in ci and "tests/test_package.py" in ci


def test_manpage_synopsis_mentions_check():
    text = read(MANPAGE)
    match = re.search(r"^\.SH\s+\"?SYNOPSIS\"?\s*$(.*?)^\.SH\s", text, re.M | re.S)
    assert match, "man page has no SYNOPSIS section"
    assert "--check" in unroff(match.group(1))


def test_manpage_synopsis_matches_usage_lines():
    """Each docopt Usage line's options appear in the SYNOPSIS."""
    usage = cli.USAGE.split("Usage:", 1)[1].split("Options:", 1)[0]
    synopsis = unroff(re.search(r"^\.SH\s+\"?SYNOPSIS\"?\s*$(.*?)^\.SH\s", read(MANPAGE),
                                re.M | re.S).group(1))
    for line in usage.strip().splitlines():
        for word in re.findall(r"(?<![\w-])--?[a-z][a-z-]*", line):
            assert mentions(synopsis, word), "%s (usage: %r) not in SYNOPSIS" % (word, line)


# --- Reasons, states and metric names: read from the code's own definitions
# (states.py, session.Outcome, app.py, selfmetrics.py) and looked for in the
# README and the man page, so a value added to the code without its docs fails
# here.

APP_PY = os.path.join(ROOT, "stapexporter_lib", "app.py")


def scrape_error_reasons():
    """The values of stap_exporter_scrape_errors_total's reason label: every
    non-OK Outcome kind (App passes outcome.kind) plus the literal reasons
    app.py returns itself (``return response, "invalid"``)."""
    import ast
    from stapexporter_lib.scripts.session import Outcome
    reasons = {value for name, value in vars(Outcome).items()
               if name.isupper() and isinstance(value, str) and value != Outcome.OK}
    with open(APP_PY, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) \
                and len(node.value.elts) == 2 and isinstance(node.value.elts[1], ast.Constant) \
                and isinstance(node.value.elts[1].value, str):
            reasons.add(node.value.elts[1].value)
    return sorted(reasons)


def session_states():
    from stapexporter_lib import states
    return sorted(states.TRANSITIONS)


def self_metric_names():
    """Names as exposed (counters with _total, info with _info), from a
    SelfMetrics registry; process_* are documented as a group."""
    from stapexporter_lib.selfmetrics import SelfMetrics

    class NoSessions:
        def all(self):
            return []
    names = {}
    for family in SelfMetrics(NoSessions()).registry.collect():
        if family.name.startswith("process_"):
            continue
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names[family.name + suffix] = family.documentation
    return names


def manpage_paragraph(text, start):
    """The man page source from the line containing START to the next .TP/.SH."""
    tail = text[text.index(start):]
    end = re.search(r"^\.(TP|SH)\b", tail[len(start):], re.M)
    return tail[:len(start) + end.start()] if end else tail


def line_with(text, needle):
    lines = [line for line in text.splitlines() if needle in line]
    assert lines, "%r not found" % needle
    return lines[0]


def test_derived_lists_are_not_empty():
    # Guards the derivations: an empty list would make the checks below vacuous.
    assert {"not_ready", "failed", "unavailable", "busy", "invalid"} <= set(scrape_error_reasons())
    assert {"stopped", "running", "failed"} <= set(session_states())
    assert "stap_exporter_scrape_errors_total" in self_metric_names()


@pytest.mark.parametrize("reason", scrape_error_reasons())
def test_scrape_error_reason_documented(reason):
    word = r"(?<![\w-])%s(?![\w-])" % re.escape(reason)
    readme_row = line_with(read(README), "`stap_exporter_scrape_errors_total{")
    assert re.search(word, readme_row), "README's scrape_errors row lacks reason %s" % reason
    man = unroff(manpage_paragraph(read(MANPAGE), "stap_exporter_scrape_errors_total{"))
    assert re.search(word, man), "man page's scrape_errors entry lacks reason %s" % reason
    help_text = self_metric_names()["stap_exporter_scrape_errors_total"]
    assert re.search(word, help_text), "the metric's help text lacks reason %s" % reason


@pytest.mark.parametrize("state", session_states())
def test_state_documented(state):
    readme_states = re.search(r"^\* States.*?(?=^\* )", read(README), re.M | re.S).group(0)
    assert "* `%s`: " % state in readme_states, "state %s not in README's States list" % state
    lifecycle = re.search(r"^\.SH LIFECYCLE$(.*?)^\.SH ", read(MANPAGE), re.M | re.S).group(1)
    assert re.search(r"^\.TP\n\.B %s\n" % state, lifecycle, re.M), \
        "state %s not in the man page's LIFECYCLE list" % state


@pytest.mark.parametrize("metric", sorted(self_metric_names()))
def test_self_metric_documented(metric):
    assert "`%s{" % metric in read(README) or "`%s`" % metric in read(README), \
        "README's /metrics table lacks %s" % metric
    selfmon = unroff(read(MANPAGE)).split(".SH SELF-MONITORING", 1)[1].split("\n.SH ", 1)[0]
    assert re.search(r"%s(?![\w])" % re.escape(metric), selfmon), \
        "man page SELF-MONITORING lacks %s" % metric


def test_log_timestamps_documented_as_utc():
    from stapexporter_lib import logs
    import logging
    record = logging.LogRecord("stap-exporter", logging.INFO, __file__, 1, "x", None, None)
    stamp = logs.LogfmtFormatter().format(record).split()[0]
    assert stamp.startswith("ts=") and stamp.endswith("Z"), stamp
    for name, text in (("README.md", read(README)), ("man page", unroff(read(MANPAGE)))):
        assert "local time" not in text, "%s says log timestamps are local time" % name
        assert re.search(r"ts=\d{4}-\d\d-\d\dT[\d:.]+Z ", text), \
            "%s's log example has no UTC timestamp" % name


def test_readme_scrapes_only_bundled_scripts():
    """Every /NAME.stp the README's examples scrape is a bundled example."""
    bundled = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "examples", "**",
                                                                   "*.stp"), recursive=True)}
    used = set(re.findall(r"/([\w.-]+\.stp)\b", read(README))) - {"NAME.stp"}
    assert used, "README scrapes no script"
    assert used <= bundled, "README refers to scripts no bundled file provides: %s" \
        % sorted(used - bundled)


OUTSIDE_REFERENCE = re.compile(r"/work/|\.\./shared/|\b(peers|real-systemtap|style)\.md\b")


def test_tools_and_tests_refer_to_no_file_outside_the_repository():
    offenders = []
    for directory in ("tools", "tests", ".ci", "debian", "bench"):
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, directory)):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or path == os.path.abspath(__file__):
                    continue
                try:
                    text = read(path)
                except (UnicodeDecodeError, OSError):
                    continue
                for lineno, line in enumerate(text.splitlines(), 1):
                    if OUTSIDE_REFERENCE.search(line):
                        offenders.append("%s:%d: %s" % (os.path.relpath(path, ROOT), lineno,
                                                        line.strip()))
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def test_debian_changelog_version_is_the_program_version():
    from stapexporter_lib import __version__
    first = read(os.path.join(ROOT, "debian", "changelog")).splitlines()[0]
    match = re.match(r"^stap-exporter \(([^)]+)\) ", first)
    assert match, first
    assert match.group(1) == __version__, \
        "debian/changelog says %s, stapexporter_lib says %s" % (match.group(1), __version__)
    th = re.search(r'^\.TH .*"stap\\-exporter ([^"]+)"', read(MANPAGE), re.M)
    assert th and th.group(1) == __version__, "man page .TH names another version"


def test_bounds_in_the_docs_are_the_codes():
    """The bounds the README and the man page quote: the module cache's."""
    from stapexporter_lib.scripts import build as compiled
    said = {"cache": "%d modules and %d MiB" % (compiled.MAX_ENTRIES,
                                                  compiled.MAX_BYTES // (1024 * 1024))}
    for path in (README, MANPAGE):
        text = " ".join(unroff(read(path)).split())
        for what, phrase in said.items():
            assert phrase in text, "%s: %s bound %r" % (path, what, phrase)
