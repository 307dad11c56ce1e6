"""The bundled user-space-probe examples (examples/bpf/) end to end, for real.

One real-stap exporter (module scope) serves copies of the three uprobe
examples and the timer histogram, so each script is compiled once (plus
nothing on the restarts, which rerun the kept module with stapbpf).

The activity the scripts count comes from a *workload* process started
before the exporter, with a unique command name (``uxw<pid>``), that keeps
calling getaddrinfo() and starting a small C program named ``uxm<pid>``
that calls malloc() MALLOCS times.  Starting before the scripts and never idling long makes
sure its command is among the first the scripts see, so it gets its own
series before the examples' 64-command cap can fill up with the host's other
commands.  For an exact measurement the test pauses it, scrapes, asks for a
burst of K calls/starts, scrapes again and compares.

Needs the real BPF runtime and user-space probes (debugfs, which
tools/stap-bpf-setup mounts, and a kernel with CONFIG_UPROBES); skips saying
why otherwise (a failure under STAP_EXPORTER_REQUIRE_REALSTAP=1).
"""

import http.client
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Exporter, wait_for

import realstap
from test_realstap_e2e import (PROCFS_DIRS, cachedirs, cleanup, event_re,
                               fifo_dirs, first_then_ok, kinds, stap_children, workdirs)

pytestmark = pytest.mark.realstap

EXAMPLES_BPF = os.path.join(ROOT, "examples", "bpf")
UPROBE_SCRIPTS = ("libc-malloc-calls.stp", "process-starts.stp", "libc-getaddrinfo.stp")
HISTOGRAM_SCRIPTS = {"timer-jitter-histogram.stp": "timer_jitter_seconds",
                     "libc-getaddrinfo.stp": "libc_getaddrinfo_duration_seconds"}
KEEPALIVE = 3          # seconds; -k of the shared exporter
BURST = 25             # calls/starts per exact measurement
BODIES = 1000          # bodies read per histogram script
ROUND_SECONDS = 0.05   # the workload's pause between background rounds
MALLOCS = 100          # malloc() calls per run of the C program

MALLOC_PROGRAM = """\
#include <stdlib.h>
int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 0;
    for (int i = 0; i < n; i++)
        free(malloc(64));
    return 0;
}
"""

# The workload: one thread (so its name is the comm every call carries),
# commands on stdin, one answer line per command on stdout.
WORKLOAD = textwrap.dedent("""\
    import ctypes, select, socket, subprocess, sys
    name, program, mallocs, round_s = sys.argv[1].encode(), sys.argv[2], sys.argv[3], float(sys.argv[4])
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)   # PR_SET_NAME

    lookups_only = False

    def one_round():
        socket.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM)
        if not lookups_only:
            subprocess.run([program, mallocs], check=True)

    paused = False
    print("ready", flush=True)
    while True:
        if select.select([sys.stdin], [], [], 0 if not paused else None)[0]:
            words = sys.stdin.readline().split()
            if not words:
                break
            if words[0] == "pause":
                paused = True
            elif words[0] == "resume":
                paused = False
            elif words[0] == "lookups-only":
                lookups_only = words[1] == "on"
            elif words[0] == "burst":
                for _ in range(int(words[1])):
                    one_round()
            print("ok", flush=True)
        elif not paused:
            one_round()
            select.select([], [], [], round_s)
    """)


class Workload:
    """The workload process: `command("burst 5")` waits for its answer."""

    def __init__(self, directory):
        self.name = "uxw%d" % os.getpid()
        self.program_name = "uxm%d" % os.getpid()
        program = os.path.join(str(directory), self.program_name)
        with open(program + ".c", "w") as f:
            f.write(MALLOC_PROGRAM)
        # -fno-builtin: every malloc() really calls libc's
        subprocess.run(["gcc", "-O0", "-fno-builtin", "-o", program, program + ".c"],
                       check=True, timeout=60)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, self.name, program, str(MALLOCS),
             str(ROUND_SECONDS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def command(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer == "ok", "workload answered %r to %r" % (answer, line)

    def stop(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def uprobe_env(tmp_path_factory):
    """(exporter, workload): the shared exporter serving the examples."""
    reason = realstap.skip_reason()
    if reason:
        pytest.skip(reason)
    rs = realstap.prepare(tmp_path_factory.mktemp("realstap"))
    reason = realstap.uprobe_skip_reason(rs)
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("uprobe")
    scripts = base / "scripts"
    scripts.mkdir()
    for name in UPROBE_SCRIPTS + tuple(HISTOGRAM_SCRIPTS):
        shutil.copy(os.path.join(EXAMPLES_BPF, name), str(scripts / name))
        os.chmod(str(scripts / name), 0o644)
    workload = Workload(base)
    exporter = None
    try:
        # The shim in the exporter's environment lets stapbpf, run directly on a
        # kept module, start in this sandbox (as in test_realstap_e2e).
        exporter = Exporter(scripts, PROCFS_DIRS, args=["-k", str(KEEPALIVE)], stap=rs.stap,
                            env={"LD_PRELOAD": rs.shim})
        yield exporter, workload
    finally:
        workload.stop()
        if exporter is not None:
            cleanup(exporter)


def by_labels(body):
    """{(sample name, frozenset of labels): value}, parsed strictly."""
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(exporter, path):
    r = exporter.get(path)
    assert r.status == 200, r
    return by_labels(r.text)


def watched(script, workload):
    """[(sample name, labels, growth per burst, exact?)] SCRIPT must show.
    Series labelled with the workload's commands are fed by nothing else."""
    workload_comm = frozenset({("comm", workload.name)})
    program_comm = frozenset({("comm", workload.program_name)})
    return {
        "libc-malloc-calls.stp": [("libc_malloc_calls_total", program_comm,
                                   BURST * MALLOCS, False)],   # + libc's own start-up
        "process-starts.stp": [("process_starts_total", program_comm, BURST, True)],
        "libc-getaddrinfo.stp": [("libc_getaddrinfo_calls_total", workload_comm, BURST, True),
                                 ("libc_getaddrinfo_duration_seconds_count", frozenset(),
                                  BURST, False)],
    }[script]


def exact_growth(exporter, workload, script):
    """Pause the workload, scrape, run a burst, scrape: the workload's series
    must have grown by the burst (exactly, for series only it feeds)."""
    path = "/" + script
    series = watched(script, workload)
    wait_for(lambda: all(key[:2] in scrape(exporter, path) for key in series),
             timeout=15, interval=0.2, message="the workload's series in %s" % script)
    workload.command("pause")
    try:
        before = scrape(exporter, path)
        workload.command("burst %d" % BURST)
        after = scrape(exporter, path)
    finally:
        workload.command("resume")
    for name, labels, growth, exact in series:
        grown = after[(name, labels)] - before[(name, labels)]
        assert grown == growth if exact else grown >= growth, (name, labels, grown, growth)


@pytest.mark.parametrize("script", UPROBE_SCRIPTS)
def test_uprobe_example_counts_and_restarts_from_kept_module(uprobe_env, script):
    exporter, workload = uprobe_env
    path = "/" + script
    by_labels(first_then_ok(exporter, path).text)  # parses strictly, or raises
    exact_growth(exporter, workload, script)

    # keepalive stop, then a restart that runs the kept module with stapbpf
    exporter.wait_log(event_re("cache", script) + r".*kept the compiled module",
                      timeout=KEEPALIVE + 20)
    exporter.wait_log(event_re("stopped", script), timeout=KEEPALIVE + 20)
    mark = len(exporter.log_lines)
    first_then_ok(exporter, path)
    line = exporter.wait_log(event_re("spawned", script), start=mark)
    argv = shlex.split(line.split("argv=", 1)[1])[0].split()     # a quoted logfmt value
    assert os.path.basename(argv[0]) == "stapbpf" and argv[-1].endswith(".bo"), line
    assert "run=load" in line, line
    exact_growth(exporter, workload, script)


def check_histogram_body(text, family):
    """Buckets cumulative and ordered, le="+Inf" last and equal to _count."""
    buckets, count = [], None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family + "_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == family + "_count":
                count = s.value
    assert buckets and buckets[-1][0] == float("inf"), text
    assert [b for b, _ in buckets] == sorted(b for b, _ in buckets), text
    values = [v for _, v in buckets]
    assert values == sorted(values), "buckets not cumulative:\n" + text
    assert values[-1] == count, "+Inf %s != _count %s:\n%s" % (values[-1], count, text)


@pytest.mark.parametrize("script", sorted(HISTOGRAM_SCRIPTS))
def test_histogram_bodies_are_self_consistent(uprobe_env, script):
    """1,000 bodies read while the script counts, over one
    keep-alive connection; every one consistent."""
    exporter, workload = uprobe_env
    family = HISTOGRAM_SCRIPTS[script]
    first_then_ok(exporter, "/" + script)
    conn = http.client.HTTPConnection(exporter.host, exporter.port, timeout=10)
    counts = []
    # Only the lookups the getaddrinfo histogram counts: the CPU is the readers'.
    workload.command("lookups-only on")
    try:
        for _ in range(BODIES):
            conn.request("GET", "/" + script)
            resp = conn.getresponse()
            body = resp.read().decode("utf-8")
            assert resp.status == 200, body
            check_histogram_body(body, family)
            counts.append(re.search(r"^%s_count (\S+)$" % family, body, re.M).group(1))
    finally:
        conn.close()
        workload.command("lookups-only off")
    assert float(counts[-1]) > float(counts[0]), "the histogram did not move while read"


def test_exporter_stop_leaves_no_process_or_fifo(uprobe_env):
    """Last in this file: stopping the shared exporter ends every stap/stapbpf
    and removes every FIFO directory and working directory."""
    exporter, _workload = uprobe_env
    for script in UPROBE_SCRIPTS:
        first_then_ok(exporter, "/" + script)
    assert kinds(stap_children(exporter)) >= {"stapbpf"}, stap_children(exporter)
    assert fifo_dirs(exporter)
    assert exporter.stop() == 0, exporter.log_text()[-3000:]
    assert not stap_children(exporter), stap_children(exporter)
    assert not fifo_dirs(exporter), fifo_dirs(exporter)
    assert not workdirs(exporter) and not cachedirs(exporter)
