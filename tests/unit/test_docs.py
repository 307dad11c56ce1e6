"""The documentation agrees with the code: every docopt option and its default
is in the man page and the README, every endpoint and status code in the man
page, each self-metric, state and scrape-error reason in docs/operating.md; the
README and the man page stay short, the man page is clean roff, and the
README's commands are the ones CI and the demo run."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT  # noqa: E402
MANPAGE = os.path.join(ROOT, "man", "stap-exporter.8")
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
OPERATING = os.path.join(DOCS, "operating.md")
WRITING = os.path.join(DOCS, "writing-scripts.md")
CI_RUN = os.path.join(ROOT, ".ci", "run")

TEST_COMMAND = "bash tools/install-deps && python3 -m pytest"
RUN_COMMAND = "bash tools/demo"

README_MAX_BYTES = 12 * 1024
MANPAGE_MAX_BYTES = 20 * 1024

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


def documented_defaults():
    """{option: default as the docs write it} for every option with a value
    default, and "off" for every flag, from docopt's reading of the usage
    text (what --help prints).  The procfs default names the exporter's user,
    which the docs write as USER."""
    from docopt import parse_defaults
    user = cli.default_procfs_dirs()[-1].split("systemtap-", 1)[1]
    defaults = {}
    for option in parse_defaults(cli.usage_text()):
        name = option.long or option.short
        if name in ("--help", "--version"):
            continue
        if option.argcount == 0:
            defaults[name] = "off"
        elif option.value is not None:
            defaults[name] = option.value.replace("systemtap-" + user, "systemtap-USER")
    return defaults


def unroff(text):
    """Man page source with the escapes that matter for option names undone."""
    text = re.sub(r"\\f(?:[BIRP]|\(..|\[[^]]*\])", "", text)  # font changes
    text = text.replace("\\-", "-").replace("\\(hy", "-").replace("\\~", " ")
    text = text.replace("\\&", "").replace("\\c\n", "")
    return text


def roff_plain(text):
    """Man page source as the reader sees it, roughly: escapes undone, font
    macros replaced by their arguments (the alternating ones joined without
    spaces), lines joined."""
    words = []
    # A non-breaking space (\~) stays inside a macro argument.
    for line in unroff(text.replace("\\~", "\0")).splitlines():
        match = re.match(r"^\.(B|I|BI|BR|IR|IB|RB|RI)\s+(.*)$", line)
        if match:
            args = re.findall(r'"([^"]*)"|(\S+)', match.group(2))
            parts = [quoted or bare for quoted, bare in args]
            line = " ".join(parts) if len(match.group(1)) == 1 else "".join(parts)
        elif line.startswith("."):
            continue
        words.append(line.replace("\0", " "))
    return " ".join(" ".join(words).split())


def manpage_section(title):
    match = re.search(r"^\.SH %s\n(.*?)(?=^\.SH |\Z)" % re.escape(title), read(MANPAGE),
                      re.M | re.S)
    assert match, "man page has no %s section" % title
    return match.group(1)


def manpage_entries(title):
    """(tag, text) of each .TP entry of a man page section, both plain."""
    entries = []
    for chunk in manpage_section(title).split(".TP\n")[1:]:
        tag, _, rest = chunk.partition("\n")
        entries.append((roff_plain(tag), roff_plain(rest)))
    return entries


def mentions(text, option):
    """OPTION appears as a whole option name (--log not matching --log-level)."""
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(option), text) is not None


def readme_option_row(option):
    """The cells of README's options-table row whose first cell names OPTION."""
    for line in read(README).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `-") and mentions(cells[0], option):
            return cells
    return None


def manpage_option_entry(option):
    for tag, text in manpage_entries("OPTIONS"):
        if mentions(tag, option):
            return text
    return None


def test_usage_has_options():
    # Guards the parser above: if it found nothing, the checks below would be vacuous.
    options = usage_options()
    for expected in ("-p", "--port", "-k", "--keepalive", "-s", "--scripts", "-c",
                     "--check", "--help", "--version"):
        assert expected in options, options
    defaults = documented_defaults()
    assert defaults["--port"] == "9900" and defaults["--recompile"] == "off", defaults


@pytest.mark.parametrize("option", usage_options())
def test_option_in_manpage(option):
    assert manpage_option_entry(option) is not None, \
        "option %s (from cli.USAGE) has no entry in man/stap-exporter.8's OPTIONS" % option


@pytest.mark.parametrize("option", usage_options())
def test_option_in_readme(option):
    assert readme_option_row(option) is not None, \
        "option %s (from cli.USAGE) has no row in README.md's options table" % option


@pytest.mark.parametrize("option,default", sorted(documented_defaults().items()))
def test_option_default_in_readme(option, default):
    row = readme_option_row(option)
    assert row is not None, "option %s has no row in README.md" % option
    assert row[-1].strip("`") == default, \
        "README.md gives %s the default %r; cli.USAGE says %r" % (option, row[-1], default)


@pytest.mark.parametrize("option,default", sorted(documented_defaults().items()))
def test_option_default_in_manpage(option, default):
    text = manpage_option_entry(option)
    assert text is not None, "option %s has no entry in the man page" % option
    said = re.findall(r"Default: (.*?)\.?$", text)
    assert said and said[0].startswith(default) and not said[0][len(default):][:1].strip(" ("), \
        "the man page gives %s the default %r; cli.USAGE says %r" % (option, said, default)


def test_sizes():
    assert os.path.getsize(README) <= README_MAX_BYTES, \
        "README.md is over %d bytes: move detail into docs/" % README_MAX_BYTES
    assert os.path.getsize(MANPAGE) <= MANPAGE_MAX_BYTES, \
        "man/stap-exporter.8 is over %d bytes: move detail into docs/" % MANPAGE_MAX_BYTES


def test_manpage_has_no_groff_warnings():
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (tools/install-deps installs groff-base)")
    proc = subprocess.run([groff, "-man", "-ww", "-z", MANPAGE], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)
    output = proc.stdout.decode("utf-8", "replace")
    assert output == "", "groff -man -ww -z man/stap-exporter.8 printed:\n" + output
    assert proc.returncode == 0


def test_readme_commands_are_what_ci_and_the_demo_run():
    readme = read(README)
    assert TEST_COMMAND in readme
    assert re.search(r"^    %s$" % re.escape(RUN_COMMAND), readme, re.M), \
        "README.md's quick start does not run %r" % RUN_COMMAND
    assert os.access(os.path.join(ROOT, "tools", "demo"), os.R_OK)
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
    assert "STAP_EXPORTER_PACKAGE_TEST=1" in ci and "tests/real/test_package.py" in ci


def test_manpage_synopsis_mentions_check():
    assert "--check" in unroff(manpage_section("SYNOPSIS"))


def test_manpage_synopsis_matches_usage_lines():
    """Each docopt Usage line's options appear in the SYNOPSIS."""
    usage = cli.USAGE.split("Usage:", 1)[1].split("Options:", 1)[0]
    synopsis = unroff(manpage_section("SYNOPSIS"))
    for line in usage.strip().splitlines():
        for word in re.findall(r"(?<![\w-])--?[a-z][a-z-]*", line):
            assert mentions(synopsis, word), "%s (usage: %r) not in SYNOPSIS" % (word, line)


@pytest.mark.parametrize("title", ["SYNOPSIS", "DESCRIPTION", "OPTIONS",
                                   "ENDPOINTS AND STATUS CODES", "SIGNALS", "FILES",
                                   "ENVIRONMENT", "EXIT STATUS", "EXAMPLES", "SECURITY",
                                   "SEE ALSO"])
def test_manpage_has_reference_section(title):
    assert manpage_section(title).strip()


# --- Endpoints, status codes, reasons, states and metric names: read from the
# code's own definitions (app.py, httpwire.py, session.Outcome, states.py,
# selfmetrics.py) and looked for in the one file that documents each.

APP_PY = os.path.join(ROOT, "stapexporter_lib", "web", "app.py")


def endpoints():
    from stapexporter_lib.web import app
    return sorted(["/", "/NAME.stp"] + list(app.ROUTES))


def status_codes():
    """Every status code the app or the HTTP layer answers with."""
    from stapexporter_lib.web import app, httpwire
    codes = {int(code) for code in app._STATUS}
    for value in vars(httpwire).values():
        if isinstance(value, bytes) and value.startswith(b"HTTP/1.1 "):
            codes.add(int(value.split()[1]))
    return sorted(codes)


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
    from stapexporter_lib.web.selfmetrics import SelfMetrics

    class NoSessions:
        def all(self):
            return []
    names = {}
    for family in SelfMetrics(NoSessions(), bpf_stats=True).registry.collect():
        if family.name.startswith("process_"):
            continue
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names[family.name + suffix] = family.documentation
    return names


def line_with(text, needle):
    lines = [line for line in text.splitlines() if needle in line]
    assert lines, "%r not found" % needle
    return lines[0]


def doc_files():
    """The user-facing documents: README, the man page, docs/*.md."""
    return [README, MANPAGE] + sorted(glob.glob(os.path.join(DOCS, "*.md")))


def test_derived_lists_are_not_empty():
    # Guards the derivations: an empty list would make the checks below vacuous.
    assert {"not_ready", "failed", "unavailable", "busy", "invalid"} <= set(scrape_error_reasons())
    assert {"stopped", "running", "failed"} <= set(session_states())
    assert "stap_exporter_scrape_errors_total" in self_metric_names()
    assert {"/", "/metrics", "/targets", "/-/healthy", "/-/ready"} <= set(endpoints())
    assert {200, 400, 401, 403, 404, 405, 408, 431, 502, 503} <= set(status_codes())
    assert {"keepalive", "autostart", "scrape-timeout", "max-series"} <= set(setting_keys())


@pytest.mark.parametrize("path", endpoints())
def test_endpoint_documented(path):
    tags = [tag for tag, _ in manpage_entries("ENDPOINTS AND STATUS CODES")]
    assert path in tags, "the man page's ENDPOINTS has no entry for %s" % path
    assert re.search(r"^\| `%s` \|" % re.escape(path), read(README), re.M), \
        "README.md's endpoint table has no row for %s" % path


@pytest.mark.parametrize("code", status_codes())
def test_status_code_in_manpage(code):
    text = roff_plain(manpage_section("ENDPOINTS AND STATUS CODES"))
    assert re.search(r"(?<![\d.])%d(?![\d.])" % code, text), \
        "status code %d is not in the man page's ENDPOINTS AND STATUS CODES" % code


@pytest.mark.parametrize("reason", scrape_error_reasons())
def test_scrape_error_reason_documented(reason):
    word = r"(?<![\w-])%s(?![\w-])" % re.escape(reason)
    row = line_with(read(OPERATING), "`stap_exporter_scrape_errors_total{")
    assert re.search(word, row), "docs/operating.md's scrape_errors row lacks %s" % reason
    help_text = self_metric_names()["stap_exporter_scrape_errors_total"]
    assert re.search(word, help_text), "the metric's help text lacks reason %s" % reason


@pytest.mark.parametrize("state", session_states())
def test_state_documented(state):
    states = read(OPERATING).split("\nThe states:\n", 1)[1].split("\n## ", 1)[0]
    assert "\n* `%s`: " % state in states, "state %s not in docs/operating.md's states" % state


@pytest.mark.parametrize("metric", sorted(self_metric_names()))
def test_self_metric_documented(metric):
    assert re.search(r"^\| `%s[{`]" % re.escape(metric), read(OPERATING), re.M), \
        "docs/operating.md's self-metrics table lacks %s" % metric


def setting_keys():
    from stapexporter_lib.scripts.settings import KEYS
    return list(KEYS)


@pytest.mark.parametrize("key", setting_keys())
def test_setting_documented(key):
    """Every key of the '# stap-exporter:' line: a row of writing-scripts.md's
    table, and in the man page's DESCRIPTION."""
    assert re.search(r"^\| `%s` \|" % re.escape(key), read(WRITING), re.M), \
        "docs/writing-scripts.md's settings table lacks %s" % key
    assert re.search(r"(?<![\w-])%s=" % re.escape(key),
                     roff_plain(manpage_section("DESCRIPTION"))), \
        "the man page's DESCRIPTION does not describe %s=" % key


def test_self_metrics_are_documented_in_one_file():
    others = [os.path.relpath(path, ROOT) for path in doc_files()
              if path != OPERATING and "stap_exporter_" in read(path)]
    assert not others, "self-metrics belong in docs/operating.md only; also in %s" % others


def test_log_timestamps_documented_as_utc():
    from stapexporter_lib import logs
    import logging
    record = logging.LogRecord("stap-exporter", logging.INFO, __file__, 1, "x", None, None)
    stamp = logs.LogfmtFormatter().format(record).split()[0]
    assert stamp.startswith("ts=") and stamp.endswith("Z"), stamp
    text = read(OPERATING)
    assert "local time" not in text, "docs/operating.md says log timestamps are local time"
    assert re.search(r"ts=\d{4}-\d\d-\d\dT[\d:.]+Z ", text), \
        "docs/operating.md's log example has no UTC timestamp"


def bundled_examples():
    return sorted(os.path.relpath(p, os.path.join(ROOT, "examples"))
                  for p in glob.glob(os.path.join(ROOT, "examples", "**", "*.stp"),
                                     recursive=True))


@pytest.mark.parametrize("example", bundled_examples())
def test_example_described_in_writing_scripts(example):
    assert re.search(r"^\| `%s` \| " % re.escape(os.path.basename(example)), read(WRITING),
                     re.M), "docs/writing-scripts.md does not describe examples/%s" % example


def test_docs_scrape_only_bundled_scripts():
    """Every /NAME.stp the README and docs/ scrape is a bundled example."""
    bundled = {os.path.basename(p) for p in bundled_examples()}
    used = set()
    for path in [README] + glob.glob(os.path.join(DOCS, "*.md")):
        used |= set(re.findall(r"/([\w.-]+\.stp)(?![\w.])", read(path))) - {"NAME.stp"}
    assert "timer-ticks.stp" in used, "README scrapes no script"
    assert used <= bundled, "the docs refer to scripts no bundled file provides: %s" \
        % sorted(used - bundled)


@pytest.mark.parametrize("path", [README] + sorted(glob.glob(os.path.join(DOCS, "*.md"))),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    missing = []
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", read(path)):
        if not os.path.exists(os.path.join(os.path.dirname(path), target)):
            missing.append(target)
    assert not missing, "%s links to missing files: %s" % (os.path.relpath(path, ROOT), missing)


def test_readme_links_every_topic():
    readme = read(README)
    for topic in ("writing-scripts", "operating", "security", "development", "internals",
                  "packaging"):
        assert "](docs/%s.md)" % topic in readme, "README.md does not link docs/%s.md" % topic


HISTORY = re.compile(r"\b(issue|point)s? [0-9]", re.I)
# Words that only describe how the code works; user documents leave them to
# docs/internals.md.
INTERNALS = re.compile(r"\b(chain|dirwatch|inotify|thread pool|greenlet|marker file|"
                       r"single-flight|FIFO)\b", re.I)


def tracked_sources():
    """Every document, program and test of the project (what a reader reads)."""
    out = subprocess.run(["git", "-C", ROOT, "ls-files"], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout.split()
    return [os.path.join(ROOT, f) for f in out
            if f.endswith((".py", ".md", ".8", ".spec")) or f.startswith(("tools/", ".ci/"))
            or f == "tests/fakestap"]


@pytest.mark.parametrize("path", tracked_sources(), ids=lambda p: os.path.relpath(p, ROOT))
def test_sources_tell_no_history(path):
    """Comments, docstrings and documents say why, not which ticket: a
    reader has no tracker."""
    found = [line for line in read(path).splitlines() if HISTORY.search(line)]
    assert not found, "%s refers to history:\n%s" % (os.path.relpath(path, ROOT),
                                                       "\n".join(found))


@pytest.mark.parametrize("path", [p for p in doc_files()
                                  if os.path.basename(p) not in ("internals.md",
                                                                 "development.md")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_user_docs_leave_out_internals(path):
    found = [line for line in read(path).splitlines() if INTERNALS.search(line)]
    assert not found, "%s describes internals:\n%s" % (os.path.relpath(path, ROOT),
                                                        "\n".join(found))


OUTSIDE_REFERENCE = re.compile(r"/work/|\.\./shared/|\b(peers|real-systemtap|style)\.md\b")


def test_tools_and_tests_refer_to_no_file_outside_the_repository():
    offenders = []
    for directory in ("tools", "tests", ".ci", "debian", "bench", "docs"):
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


def test_cache_bounds_in_the_manpage_are_the_codes():
    from stapexporter_lib.scripts import build as compiled
    phrase = "%d modules and %d MiB" % (compiled.MAX_ENTRIES, compiled.MAX_BYTES // (1024 * 1024))
    assert phrase in roff_plain(read(MANPAGE)), "the man page's cache bound is not %r" % phrase
