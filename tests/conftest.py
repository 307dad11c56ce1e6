"""Shared fixtures: a real stap-exporter daemon started as a user would, on a
free loopback port, with the stand-in ``fakestap`` as its systemtap."""

import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
FAKESTAP = os.path.join(TESTS, "fakestap")
EXPORTER = os.path.join(ROOT, "stapexporter.py")

if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll PREDICATE until it returns a true value or TIMEOUT passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_matching(text):
    """Pids of live processes whose command line contains TEXT."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def process_group(pid):
    """Pids of PID's process group."""
    pgid = os.getpgid(pid)
    members = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getpgid(int(entry)) == pgid:
                members.append(int(entry))
        except OSError:
            continue
    return members


_FAKE_LOADERS = []


def fake_loader_dir():
    """A directory where stapbpf and staprun are fakestap (made once)."""
    if not _FAKE_LOADERS:
        import tempfile
        bindir = tempfile.mkdtemp(prefix="fakestap-loaders.")
        for loader in ("stapbpf", "staprun"):
            os.symlink(FAKESTAP, os.path.join(bindir, loader))
        _FAKE_LOADERS.append(bindir)
    return _FAKE_LOADERS[0]


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def __repr__(self):
        return "<Response %d %r>" % (self.status, self.body[:200])


class Exporter:
    """A stap-exporter subprocess."""

    def __init__(self, scripts, procfs, args=(), env=None, host="127.0.0.1", stap=FAKESTAP,
                 extra_procfs=()):
        self.scripts = str(scripts)
        self.procfs = str(procfs)
        self.log_lines = []
        self._log_cond = threading.Condition()
        listen = ["--listen", host] if host else []  # None: the default (all interfaces)
        self.host = host or "127.0.0.1"
        cmd = [sys.executable, EXPORTER, "-p", "0"] + listen + ["-s", self.scripts,
               "--stap", stap, "--procfs-dirs", ":".join([self.procfs] + list(extra_procfs)),
               "--log-level", "debug"]
        cmd += list(args)
        # Each exporter keeps compiled modules in a cache of its own unless
        # the test names one (tests of the persistent cache share one).
        self.own_cache = None
        if "--cache-dir" not in args:
            import tempfile
            self.own_cache = tempfile.mkdtemp(prefix="stapexp-test-cache.")
            cmd += ["--cache-dir", self.own_cache]
        # fakestap also plays the runtime's loader (stapbpf/staprun) for the
        # reuse of compiled modules.
        path = os.environ.get("PATH", "")
        if stap.split()[0] == FAKESTAP:  # also with options after it
            path = fake_loader_dir() + os.pathsep + path
        full_env = dict(os.environ, FAKESTAP_PROCFS=self.procfs, PATH=path)
        # The real runtime's loaders run without the stap-bpf-setup wrapper,
        # which sets the setrlimit shim only for the stap it runs: they find
        # it in the exporter's environment (a test-harness device).
        shim = os.path.join(os.path.dirname(stap.split()[0]), "setrlimit-shim.so")
        if os.path.exists(shim):
            full_env["LD_PRELOAD"] = shim
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        line = self.wait_log(r"listening on (\S+), scripts|\"event\": \"started\"", timeout=15)
        addr = re.search(r"listening on (\S+), scripts", line).group(1)
        self.port = int(addr.rsplit(":", 1)[1])
        self.module_prefix = "stapexp_%d_" % self.proc.pid

    def _read_log(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._log_cond:
                self.log_lines.append(line)
                self._log_cond.notify_all()

    def log_text(self):
        with self._log_cond:
            return "\n".join(self.log_lines)

    def wait_log(self, pattern, timeout=10.0, start=0):
        """Wait for a log line matching PATTERN (a regex); return it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._log_cond:
            i = start
            while True:
                while i < len(self.log_lines):
                    if rx.search(self.log_lines[i]):
                        return self.log_lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and i >= len(self.log_lines)):
                    raise AssertionError("no log line matching %r within %.1fs; log:\n%s"
                                         % (pattern, timeout, "\n".join(self.log_lines[-40:])))
                self._log_cond.wait(min(left, 0.2))

    def request(self, path, method="GET", headers=None, timeout=10.0, source=None):
        """PATH's response, on a new connection (from address SOURCE, if given)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout,
                                          source_address=(source, 0) if source else None)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, resp.getheaders(), resp.read())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request(path, **kw)

    def get_until(self, path, status=200, timeout=15.0, **kw):
        """GET PATH until it answers STATUS; return that response."""
        last = []

        def attempt():
            r = self.get(path, **kw)
            last[:] = [r]
            return r if r.status == status else None
        try:
            return wait_for(attempt, timeout=timeout, interval=0.1,
                            message="%s to answer %d" % (path, status))
        except AssertionError:
            raise AssertionError("%s never answered %d; last: %r" % (path, status, last))

    def children(self):
        """Pids of live processes running one of this exporter's modules."""
        return processes_matching(self.module_prefix)

    def settled_children(self, count, timeout=10.0):
        """children() once there are COUNT of them: a chained compile's
        killed compiler goes a moment after the loader has taken over (its
        exit frees tens of MB), which under load can be after the output."""
        def settled():
            children = self.children()
            return children if len(children) == count else None
        return wait_for(settled, timeout=timeout, message="%d children" % count)

    def child_groups(self):
        """The process groups of children(): one per script start under way
        or running (a compile's group holds its shell, the subshell minding
        the compiler, and the compiler)."""
        groups = set()
        for pid in self.children():
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        return sorted(groups)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=20.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        if self.own_cache:
            import shutil
            shutil.rmtree(self.own_cache, ignore_errors=True)
        return self.proc.returncode


class Scraper:
    """A client that GETs PATH from EXPORTER every 20 ms in a thread, as a
    tight Prometheus would; every answer is kept as (monotonic time, status
    or the exception, body)."""

    INTERVAL = 0.02

    def __init__(self, exporter, path):
        self.answers = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(exporter, path), daemon=True)
        self._thread.start()
        wait_for(lambda: len(self.answers) >= 5, message="the first scrapes")

    def _run(self, exporter, path):
        while not self._stop.is_set():
            try:
                r = exporter.get(path, timeout=10)
                self.answers.append((time.monotonic(), r.status, r.body))
            except Exception as exc:  # noqa: BLE001 -- kept and reported as a failure
                self.answers.append((time.monotonic(), repr(exc), b""))
            self._stop.wait(self.INTERVAL)

    def first(self, needle):
        """When an answer first held NEEDLE, or None."""
        return next((t for t, _status, body in self.answers if needle in body), None)

    def finish(self):
        """Stop; every answer that was not a 200."""
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive()
        return [(status, body[:300]) for _t, status, body in self.answers if status != 200]


def private_copy(path, name):
    """True if PATH is the exporter's private copy of the script NAME: the
    file in a start's own working directory (what is compiled and run, so
    that nobody can swap the script between its check and its use)."""
    return re.fullmatch(r"%s/stap-exporter\.\d+\.stapexp_\w+\.\w+/%s" % (
        re.escape(tempfile.gettempdir()), re.escape(name)), path) is not None


def write_script(directory, name, directives="", executable=False, body=None):
    """Write a script for fakestap.  DIRECTIVES go on a '# fake:' line."""
    path = os.path.join(str(directory), name)
    text = ""
    if executable:
        text += "#!%s\n" % FAKESTAP
    text += "# fake: %s\n" % directives
    # Its name in it: scripts of equal content share a compiled module (as
    # with real stap), and a fake module would then report the other's name.
    text += "# script: %s\n" % name
    text += body if body is not None else (
        'global n\nprobe timer.s(1) { n++ }\n'
        'probe prometheus { @prometheus_dump_array0(n, "n") }\n')
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755 if executable else 0o644)
    return path


@pytest.fixture
def dirs(tmp_path):
    return make_dirs(tmp_path)


def make_dirs(base):
    """(scripts, procfs): empty directories under BASE, as an exporter needs."""
    scripts, procfs = base / "scripts", base / "procfs"
    scripts.mkdir()
    procfs.mkdir()
    return scripts, procfs


@pytest.fixture
def exporter_factory(dirs):
    """Start exporters on the fixture directories; all are stopped (and their
    children checked gone) at the end of the test."""
    started = []
    scripts, procfs = dirs

    def start(args=(), **kw):
        exp = Exporter(scripts, procfs, args=args, **kw)
        started.append(exp)
        return exp
    yield start
    for exp in started:
        stop_and_check(exp)


def stop_and_check(exp):
    """Stop EXP; fail if any child outlived it (after killing it)."""
    exp.stop()
    left = exp.children()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, "children left behind: %s" % left


REQUIRE_REALSTAP = os.environ.get("STAP_EXPORTER_REQUIRE_REALSTAP") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where the real runtime and peers are required (CI), a skipped realstap,
    peers or debian_tools test fails."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_REALSTAP and report.skipped and (item.get_closest_marker("realstap")
                                                or item.get_closest_marker("peers")
                                                or item.get_closest_marker("debian_tools")):
        report.outcome = "failed"
        report.longrepr = ("realstap test skipped but STAP_EXPORTER_REQUIRE_REALSTAP=1: %s"
                           % (report.longrepr,))
