"""stap-exporter end to end with the REAL SystemTap BPF runtime.

Every test starts the real daemon (conftest ``Exporter``) with ``--stap`` set to
the wrapper written by tools/stap-bpf-setup (see tests/realstap.py) and the
real runtime's output directories as ``--procfs-dirs``.  Every wait is on a condition with a deadline.
Whatever happens, each test's teardown stops its exporter, SIGKILLs every
process whose command line carries the exporter's module prefix
(``stapexp_<exporterpid>_``) and removes that exporter's FIFO directories and
working directories.
"""

import glob
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Exporter, Scraper, process_group, processes_matching, wait_for

import realstap

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from stapexporter_lib import cli  # noqa: E402

pytestmark = pytest.mark.realstap

EXAMPLES_BPF = os.path.join(ROOT, "examples", "bpf")

# Where the BPF runtime creates MODULE/__prometheus (/var/tmp/systemtap-root).
FIFO_ROOT = os.path.dirname(os.path.dirname(realstap.fifo_path("x")))
PROCFS_DIRS = ":".join(cli.default_procfs_dirs())

TICKS = """\
global ticks%
probe timer.ms(100) { ticks[cpu()]++ }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
"""

# Scalar metrics only: every metric name appears exactly once in an output.
SCALARS = """\
global n, reads
probe timer.ms(50) { n++ }
probe prometheus {
    reads++
    $value .= "scalar_ticks_total " . sprint(n) . "\\n"
    $value .= "scalar_reads_total " . sprint(reads) . "\\n"
    $value .= "scalar_answer 42\\n"
}
"""

BROKEN = """\
global ticks%
probe timer.ms(100) { ticks[cpu()]++; no_such_function_xyz() }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
"""

COMPILE_TIMEOUT = 60.0

# A script whose output and `probe end` say which version runs.
VERSIONED = """\
global ticks
probe timer.ms(50) { ticks++ }
probe prometheus {
    $value .= "live_version %d\\n"
    $value .= "live_ticks " . sprint(ticks) . "\\n"
}
probe end { printf("live version %d ends\\n") }
"""


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    reason = realstap.skip_reason()
    if reason:
        pytest.skip(reason)
    return realstap.prepare(tmp_path_factory.mktemp("realstap"))


# ------------------------------------------------------------------ helpers

def fifo_dirs(exporter):
    """This exporter's module directories under the BPF runtime's root."""
    return glob.glob(os.path.join(FIFO_ROOT, exporter.module_prefix + "*"))


def workdirs(exporter):
    """This exporter's private working directories (stap-exporter.<pid>.*),
    not counting its compiled-module cache."""
    return [d for d in glob.glob(os.path.join(tempfile.gettempdir(),
                                              "stap-exporter.%d.*" % exporter.proc.pid))
            if d not in cachedirs(exporter)]


def cachedirs(exporter):
    """This exporter's compiled-module cache (kept while it runs)."""
    return glob.glob(os.path.join(tempfile.gettempdir(),
                                  "stap-exporter.%d.cache.*" % exporter.proc.pid))


def compiled_leftovers(*dirs):
    found = []
    for d in dirs:
        for root, _subdirs, files in os.walk(str(d)):
            found += [os.path.join(root, f) for f in files if f.endswith((".bo", ".ko"))]
    return found


def stap_children(exporter):
    """(pid, cmdline) of live processes running one of this exporter's modules."""
    out = []
    for pid in exporter.children():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                out.append((pid, f.read().replace(b"\0", b" ").decode("utf-8", "replace")))
        except OSError:
            pass
    return out


def kinds(children):
    """Which of stap / stapbpf are among CHILDREN."""
    found = set()
    for _pid, cmd in children:
        argv0 = os.path.basename(cmd.split(" ", 1)[0])
        if argv0 == "stapbpf":
            found.add("stapbpf")
        elif argv0 == "stap" or "/stap " in cmd:
            found.add("stap")
    return found


def group_commands(pid):
    """The program names (argv[0] base names) of PID's process group."""
    names = []
    for member in process_group(pid):
        try:
            with open("/proc/%d/cmdline" % member, "rb") as f:
                names.append(os.path.basename(f.read().split(b"\0")[0].decode()))
        except (OSError, UnicodeDecodeError):
            continue
    return names


def samples(body):
    """{sample name: sum of values} of a Prometheus text body (parsed strictly)."""
    totals = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def event_re(event, script=None):
    """A regex for a log line of EVENT (about SCRIPT), logfmt or JSON."""
    rx = r'\bevent"?\s*[=:]\s*"?%s\b' % re.escape(event)
    if script is not None:
        rx += r'.*\bscript"?\s*[=:]\s*"?%s\b' % re.escape(script)
    return rx


def cleanup(exporter):
    """Stop EXPORTER and remove every trace of it, whatever state it is in."""
    try:
        exporter.stop()
    finally:
        for pid in processes_matching(exporter.module_prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for d in fifo_dirs(exporter) + workdirs(exporter) + cachedirs(exporter):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scripts(tmp_path):
    d = tmp_path / "scripts"
    d.mkdir()
    return d


@pytest.fixture
def start(rs, scripts):
    """start(args=()) -> a real-stap Exporter on SCRIPTS; cleaned up afterwards."""
    started = []

    def _start(args=(), env=None):
        # The loaders run without the --stap wrapper: the setrlimit shim goes
        # into the exporter's environment (see tests/realstap.py).
        env = dict({"LD_PRELOAD": rs.shim}, **(env or {}))
        exp = Exporter(scripts, PROCFS_DIRS, args=args, stap=rs.stap, env=env)
        started.append(exp)
        return exp
    yield _start
    for exp in started:
        cleanup(exp)


def write(directory, name, text):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def first_then_ok(exporter, path):
    """The first request answers 503 (compiling) or 200; then 200 within the
    compile deadline.  Returns the 200 response."""
    first = exporter.get(path)
    assert first.status in (200, 503), first
    if first.status == 200:
        return first
    return exporter.get_until(path, 200, timeout=COMPILE_TIMEOUT)


def assert_counter_grows(exporter, path, name):
    r = first_then_ok(exporter, path)
    before = samples(r.text)
    assert name in before, "no %s in %r" % (name, r.text)
    grown = []

    def grew():
        r2 = exporter.get(path)
        assert r2.status == 200, r2
        now = samples(r2.text)
        grown[:] = [now.get(name)]
        return now.get(name, 0) > before[name]
    wait_for(grew, timeout=15, interval=0.1, message="%s to grow past %s" % (name, before[name]))
    assert grown[0] > before[name]


# ------------------------------------------------------------------ tests

def test_plain_script_via_stap_counter_grows(start, scripts):
    shutil.copy(os.path.join(EXAMPLES_BPF, "timer-ticks.stp"), str(scripts / "ticks.stp"))
    os.chmod(str(scripts / "ticks.stp"), 0o644)
    exp = start()
    assert_counter_grows(exp, "/ticks.stp", "timer_ticks_total")
    # It really is the real runtime: compiled by stap, then stapbpf alone runs
    # our module (its process group holds no stap), and the output is a FIFO.
    children = stap_children(exp)
    assert kinds(children) == {"stapbpf"}, children
    assert [os.path.basename(c.split()[0]) for _p, c in children] == ["stapbpf"], children
    assert group_commands(children[0][0]) == ["stapbpf"], group_commands(children[0][0])
    exp.wait_log(event_re("compiling", "ticks.stp"))
    fifos = [os.path.join(d, "__prometheus") for d in fifo_dirs(exp)]
    assert len(fifos) == 1 and os.path.exists(fifos[0]), fifos
    assert stat.S_ISFIFO(os.stat(fifos[0]).st_mode)


def test_executable_wrapper_counter_grows(rs, start, scripts):
    rs.write_wrapper_script(scripts / "wrapped.stp", TICKS)
    exp = start()
    assert_counter_grows(exp, "/wrapped.stp", "ticks")
    # The wrapper exec'd stap: the script ran as MODULE of this exporter.
    children = stap_children(exp)
    assert kinds(children) == {"stap", "stapbpf"}, children
    assert any("wrapped.stp.real" in cmd for _pid, cmd in children), children


def test_semantic_error_is_502_with_systemtap_text(start, scripts):
    write(scripts, "broken.stp", BROKEN)
    exp = start()
    r = exp.get_until("/broken.stp", 502, timeout=COMPILE_TIMEOUT)
    assert "semantic error" in r.text, r.text
    assert "no_such_function_xyz" in r.text, r.text
    wait_for(lambda: not exp.children(), timeout=10, message="failed stap to be gone")
    assert not fifo_dirs(exp)


def test_keepalive_stops_real_script_and_cleans_up(start, scripts):
    write(scripts, "ticks.stp", TICKS)
    exp = start(["-k", "2"])
    first_then_ok(exp, "/ticks.stp")
    running = stap_children(exp)
    assert kinds(running) == {"stapbpf"}, running
    # stapbpf runs the .bo that stap compiled, in the exporter's private working dir.
    (pid, cmd), = running
    assert cmd.split()[-1].endswith(".bo"), cmd
    assert os.path.basename(os.readlink("/proc/%d/cwd" % pid)).startswith(
        "stap-exporter.%d." % exp.proc.pid)
    assert fifo_dirs(exp) and workdirs(exp)
    exp.wait_log(event_re("stopped", "ticks.stp"), timeout=20)
    assert not stap_children(exp), stap_children(exp)
    assert not fifo_dirs(exp), fifo_dirs(exp)
    assert not workdirs(exp), workdirs(exp)
    assert not compiled_leftovers(scripts), compiled_leftovers(scripts)
    assert not compiled_leftovers(ROOT), compiled_leftovers(ROOT)


def test_autostart_serves_before_any_request(start, scripts):
    write(scripts, "autostart-ticks.stp", TICKS)
    exp = start()
    pattern = os.path.join(FIFO_ROOT, exp.module_prefix + "*", "__prometheus")
    wait_for(lambda: glob.glob(pattern), timeout=COMPILE_TIMEOUT,
             message="the autostart script's FIFO %s" % pattern)
    access = re.compile(event_re("access"))
    assert not [l for l in exp.log_lines if access.search(l)], "a request was made"
    r = exp.get("/autostart-ticks.stp")
    assert r.status == 200, r
    assert "ticks" in samples(r.text), r.text


def test_sigterm_stops_every_real_process(rs, start, scripts):
    write(scripts, "ticks.stp", TICKS)
    rs.write_wrapper_script(scripts / "wrapped.stp", SCALARS)
    write(scripts, "autostart-ticks.stp", TICKS)
    exp = start()
    first_then_ok(exp, "/ticks.stp")
    first_then_ok(exp, "/wrapped.stp")
    pattern = os.path.join(FIFO_ROOT, exp.module_prefix + "*", "__prometheus")
    wait_for(lambda: len(glob.glob(pattern)) == 3, timeout=COMPILE_TIMEOUT,
             message="three FIFOs")
    running = stap_children(exp)
    assert kinds(running) == {"stap", "stapbpf"}, running  # the wrapper's stap
    assert len(running) >= 4, running  # stapbpf per plain script, stap + stapbpf for the wrapper
    exp.signal(signal.SIGTERM)
    assert exp.proc.wait(30) == 0, exp.log_text()[-3000:]
    assert not stap_children(exp), stap_children(exp)
    assert not fifo_dirs(exp), fifo_dirs(exp)
    assert not workdirs(exp), workdirs(exp)
    assert not compiled_leftovers(scripts)


def test_sigkill_of_exporter_stops_real_processes(start, scripts):
    write(scripts, "ticks.stp", TICKS)
    exp = start()
    first_then_ok(exp, "/ticks.stp")
    running = stap_children(exp)
    assert kinds(running) == {"stapbpf"}, running
    assert fifo_dirs(exp)
    exp.proc.kill()
    exp.proc.wait(10)
    # PR_SET_PDEATHSIG: stapbpf gets SIGTERM.
    wait_for(lambda: not stap_children(exp), timeout=15, interval=0.1,
             message="stap/stapbpf of a SIGKILLed exporter to exit (left: %s)" % running)
    wait_for(lambda: not fifo_dirs(exp), timeout=15, interval=0.1,
             message="the FIFO directories of a SIGKILLed exporter to go")


def test_concurrent_scrapes_each_get_one_copy(start, scripts):
    write(scripts, "scalars.stp", SCALARS)
    exp = start()
    first_then_ok(exp, "/scalars.stp")
    n = 30
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        try:
            barrier.wait(10)
            results[i] = exp.get("/scalars.stp", timeout=30)
        except Exception as exc:  # reported below
            results[i] = exc
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    names = ("scalar_ticks_total", "scalar_reads_total", "scalar_answer")
    for r in results:
        assert not isinstance(r, Exception), r
        assert r.status == 200, r
        metric_lines = [l for l in r.text.splitlines() if l and not l.startswith("#")]
        got = sorted(l.split()[0] for l in metric_lines)
        assert got == sorted(names), r.text
        assert set(samples(r.text)) == set(names), r.text


def loads_without_compiling(exp, mark, name="ticks.stp"):
    """The start logged after MARK loaded a kept module with stapbpf, with no
    compile; returns its argv."""
    line = exp.wait_log(event_re("spawned", name), start=mark)
    argv = shlex.split(line.split("argv=", 1)[1])[0].split()     # a quoted logfmt value
    assert os.path.basename(argv[0]) == "stapbpf" and argv[-1].endswith(".bo"), line
    assert "run=load" in line, line
    compiling = re.compile(event_re("compiling", name))
    assert not [l for l in exp.log_lines[mark:] if compiling.search(l)]
    return argv


def test_kept_module_survives_keepalive_stop_and_exporter_restart(start, scripts, tmp_path):
    """The compiled module goes to --cache-dir: after a keepalive stop, and
    after the exporter itself is restarted, the script is loaded by stapbpf
    at once, without compiling, and serves metrics."""
    cache = str(tmp_path / "module-cache")
    write(scripts, "ticks.stp", TICKS)
    exp = start(["-k", "1", "--cache-dir", cache])
    first_then_ok(exp, "/ticks.stp")
    exp.wait_log(event_re("cache", "ticks.stp") + r".*kept the compiled module", timeout=20)
    assert [f for f in os.listdir(cache) if f.endswith(".bo")]
    exp.wait_log(event_re("stopped", "ticks.stp"), timeout=20)
    assert not workdirs(exp) and not fifo_dirs(exp) and not cachedirs(exp)
    mark = len(exp.log_lines)
    assert "ticks" in samples(first_then_ok(exp, "/ticks.stp").text)
    loads_without_compiling(exp, mark)
    assert kinds(stap_children(exp)) == {"stapbpf"}
    cleanup(exp)
    assert [f for f in os.listdir(cache) if f.endswith(".bo")], "the cache must survive"
    again = start(["--cache-dir", cache])
    assert "ticks" in samples(first_then_ok(again, "/ticks.stp").text)
    loads_without_compiling(again, 0)


def test_compiled_module_that_fails_is_recompiled(start, scripts, tmp_path):
    """A kept module that stapbpf cannot load (here: its cache entry was
    damaged) is forgotten and the script compiled afresh within the same
    request cycle, never reporting a 502."""
    cache = str(tmp_path / "module-cache")
    write(scripts, "ticks.stp", TICKS)
    exp = start(["-k", "1", "--cache-dir", cache])
    first_then_ok(exp, "/ticks.stp")
    exp.wait_log(event_re("stopped", "ticks.stp"), timeout=20)
    for name in os.listdir(cache):
        with open(os.path.join(cache, name), "r+b") as f:
            f.write(b"\0not a BPF module\0" * 64)
    statuses = set()

    def ok():
        r = exp.get("/ticks.stp")
        statuses.add(r.status)
        return r.status == 200
    wait_for(ok, timeout=COMPILE_TIMEOUT, interval=0.2, message="200 after recompiling")
    assert 502 not in statuses, statuses
    exp.wait_log(event_re("cache", "ticks.stp") + r".*compiled module failed.*recompiling")


def test_an_edit_takes_over_with_no_failed_scrape(start, scripts):
    """A client scraping every 20 ms while the script is edited sees only
    200s, and the new version's output within 3 s of the edit; the old
    stapbpf stops with its probe end run.  A broken edit then keeps the 200s
    coming and puts stap's error on the index page."""
    path = write(scripts, "live.stp", VERSIONED % (1, 1))
    exp = start()
    assert "live_version 1" in first_then_ok(exp, "/live.stp").text
    (old_pid, _cmd), = stap_children(exp)
    scraper = Scraper(exp, "/live.stp")
    write(scripts, "live.stp.new", VERSIONED % (2, 2))
    os.rename(str(scripts / "live.stp.new"), path)
    edited = time.monotonic()
    wait_for(lambda: scraper.first(b"live_version 2"), timeout=COMPILE_TIMEOUT,
             message="the new version's output")
    assert scraper.first(b"live_version 2") - edited < 3.0
    exp.wait_log(r"event=stdout script=live\.stp pid=%d .*live version 1 ends" % old_pid)
    wait_for(lambda: len(stap_children(exp)) == 1, message="the old stapbpf to be gone")
    (new_pid, cmd), = stap_children(exp)
    assert new_pid != old_pid and "stapexp_%d__live.bo" % exp.proc.pid in cmd, cmd
    assert len(fifo_dirs(exp)) == 1
    # A broken edit: the version running goes on.
    write(scripts, "live.stp", BROKEN)
    exp.wait_log(event_re("edit-failed", "live.stp"), timeout=COMPILE_TIMEOUT)
    index = exp.get("/").text
    assert "semantic error" in index and "no_such_function_xyz" in index, index
    time.sleep(0.5)
    failures = scraper.finish()
    assert not failures, failures[:5]
    assert b"live_version 2" in scraper.answers[-1][2]
    assert [pid for pid, _cmd in stap_children(exp)] == [new_pid]
