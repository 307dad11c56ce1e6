"""The documentation agrees with the code: every docopt option is documented in
the man page and the README, the man page is clean roff, and the README's test
command is the one CI runs."""

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


# -- states and self-metrics: read from the code, documented in both places ------

def code_states():
    from stapexporter_lib import states
    return list(states.ALL_STATES)


def code_metric_names():
    """Every self-metric name as /metrics exposes it (counters with _total,
    info with _info), read from a SelfMetrics registry with no scripts."""
    from stapexporter_lib.selfmetrics import SelfMetrics

    class NoScripts:
        def all(self):
            return []
    suffix = {"counter": "_total", "info": "_info"}
    names = []
    for family in SelfMetrics(NoScripts()).registry.collect():
        if not family.name.startswith("process_"):  # documented as process_*
            names.append(family.name + suffix.get(family.type, ""))
    return sorted(names)


def test_code_lists_states_and_metrics():
    # Guards the readers above: the checks below would be vacuous without them.
    assert {"running", "backoff", "refused"} <= set(code_states())
    assert {"stap_exporter_script_up", "stap_exporter_script_state",
            "stap_exporter_script_starts_total", "stap_exporter_build_info"} \
        <= set(code_metric_names())


@pytest.mark.parametrize("state", code_states())
def test_state_documented(state):
    readme_states = re.search(r"^\* States.*?(?=^\* )", read(README), re.M | re.S).group(0)
    assert "* `%s`: " % state in readme_states, "state %s not in README's States list" % state
    lifecycle = re.search(r"^\.SH LIFECYCLE$(.*?)^\.SH ", read(MANPAGE), re.M | re.S).group(1)
    assert re.search(r"^\.TP\n\.B %s\n" % state, lifecycle, re.M), \
        "state %s not in the man page's LIFECYCLE list" % state


@pytest.mark.parametrize("name", code_metric_names())
def test_metric_documented(name):
    assert re.search(r"^\| `%s[{`]" % re.escape(name), read(README), re.M), \
        "metric %s not in README's /metrics table" % name
    monitoring = re.search(r"^\.SH SELF\\-MONITORING$(.*?)^\.SH ", read(MANPAGE),
                           re.M | re.S).group(1)
    assert re.search(r'^\.B "?%s[{"\n]' % re.escape(name), monitoring, re.M), \
        "metric %s not in the man page's SELF-MONITORING list" % name
