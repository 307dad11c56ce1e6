"""Shared helpers for the benchmarks in bench/.

Everything here talks to 127.0.0.1 only, starts the exporter (and nginx, wrk,
baselines) as children, and tears all of it down at exit -- also on Ctrl-C or
SIGTERM -- including any stand-in script left behind (processes whose command
line contains ``stapexp_<exporterpid>_``).
"""

import atexit
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
# STAPEXP_BENCH_ROOT: run another copy of the project (e.g. a snapshot made
# with `git archive` or cp) instead of this checkout.
ROOT = os.path.abspath(os.environ.get("STAPEXP_BENCH_ROOT") or os.path.dirname(BENCH))
EXPORTER = os.path.join(ROOT, "stapexporter.py")
FAKESTAP = os.path.join(ROOT, "tests", "fakestap")
STAP_BPF_SETUP = os.path.join(ROOT, "tools", "stap-bpf-setup")
HOST = "127.0.0.1"

# ---------------------------------------------------------------------------
# clean-up registry


_cleanups = []
_cleanup_lock = threading.Lock()


def on_exit(fn):
    """Run FN (once) at exit, newest first.  Returns FN."""
    with _cleanup_lock:
        _cleanups.append(fn)
    return fn


def run_cleanups():
    while True:
        with _cleanup_lock:
            if not _cleanups:
                return
            fn = _cleanups.pop()
        try:
            fn()
        except Exception as exc:  # keep cleaning
            print("cleanup: %s: %s" % (getattr(fn, "__name__", fn), exc), file=sys.stderr)


def _on_signal(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def install_signal_handlers():
    """Ctrl-C and SIGTERM unwind (KeyboardInterrupt) so the clean-ups run."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


atexit.register(run_cleanups)


def main_wrapper(main):
    """Run MAIN() with clean-ups guaranteed; exit status from MAIN."""
    install_signal_handlers()
    try:
        status = main()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the exporter and its children", file=sys.stderr)
        status = 130
    finally:
        run_cleanups()
    sys.exit(status or 0)


def make_tempdir(prefix="stapexp-bench."):
    path = tempfile.mkdtemp(prefix=prefix)
    on_exit(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def stop_process(proc, timeout=20.0, sig=signal.SIGTERM):
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------
# processes


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_matching(text):
    """Pids of live processes whose command line contains TEXT."""
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """utime+stime of PID in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_script(directory, name, directives="", body=None):
    """A stand-in script for fakestap; DIRECTIVES go on its '# fake:' line."""
    path = os.path.join(directory, name)
    text = "# fake: %s\n" % directives
    text += body if body is not None else (
        'global n\nprobe timer.s(1) { n++ }\n'
        'probe prometheus { @prometheus_dump_array0(n, "n") }\n')
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


# ---------------------------------------------------------------------------
# the exporter


class Exporter:
    """A stap-exporter child on a free loopback port (``-p 0``)."""

    def __init__(self, scripts, procfs, args=(), stap=None, env=None, log_level="info",
                 startup_timeout=60.0, python=None, prefix_cmd=(), exporter=EXPORTER):
        self.scripts = scripts
        self.procfs = procfs
        stap = stap or FAKESTAP
        cmd = list(prefix_cmd) + [python or sys.executable, exporter, "-p", "0",
                                  "--listen", HOST, "-s", scripts, "--stap", stap,
                                  "--procfs-dirs", procfs, "--log-level", log_level]
        cmd += list(args)
        full_env = dict(os.environ, FAKESTAP_PROCFS=procfs)
        full_env.update(env or {})
        self.log_lines = []
        self._cond = threading.Condition()
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        self.pid = self.proc.pid
        self.module_prefix = "stapexp_%d_" % self.pid
        on_exit(self.stop)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        line = self.wait_log(r"listening on (\S+), scripts", timeout=startup_timeout)
        self.t_listening = time.monotonic()
        self.port = int(re.search(r"listening on (\S+), scripts", line).group(1)
                        .rsplit(":", 1)[1])
        self.url = "http://%s:%d" % (HOST, self.port)

    def _read_log(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.log_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                if len(self.log_lines) > 200000:  # bound memory on long soaks
                    del self.log_lines[:100000]
                self._cond.notify_all()

    def wait_log(self, pattern, timeout=10.0):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = 0
            while True:
                while i < len(self.log_lines):
                    if rx.search(self.log_lines[i]):
                        return self.log_lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and i >= len(self.log_lines)):
                    raise RuntimeError("exporter: no log line matching %r; log tail:\n%s"
                                       % (pattern, "\n".join(self.log_lines[-30:])))
                self._cond.wait(min(left, 0.2))

    def get(self, path, headers=None, timeout=10.0):
        """One request on a fresh connection: (status, headers dict, body)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get_until(self, path, status=200, timeout=30.0, interval=0.05):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.get(path)
                if last[0] == status:
                    return last
            except OSError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeError("%s never answered %d; last: %r" % (path, status, last))
            time.sleep(interval)

    def index_states(self):
        """{script: state} from the text index page."""
        _, _, body = self.get("/")
        states = {}
        for line in body.decode("utf-8", "replace").splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[0] != "SCRIPT" and parts[0] != "error:":
                states[parts[0]] = parts[1]
        return states

    def children(self):
        return processes_matching(self.module_prefix)

    def stop(self, timeout=30.0):
        """SIGTERM, wait; then kill anything of ours left behind.  Returns
        the pids that were left behind (killed)."""
        stop_process(self.proc, timeout)
        self._reader.join(5)
        left = self.children()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return left


# ---------------------------------------------------------------------------
# nginx


class Nginx:
    """nginx serving DOCROOT on a free loopback port, one worker, gzip for
    text/plain when asked (like the exporter would)."""

    def __init__(self, docroot, workdir, workers=1):
        self.port = free_port()
        conf = os.path.join(workdir, "nginx.conf")
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(workdir, d), exist_ok=True)
        with open(conf, "w") as f:
            f.write("""worker_processes %d;
pid %s/nginx.pid;
error_log %s/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %s/client_body;
    proxy_temp_path %s/proxy;
    fastcgi_temp_path %s/fastcgi;
    uwsgi_temp_path %s/uwsgi;
    scgi_temp_path %s/scgi;
    keepalive_requests 1000000;
    default_type text/plain;
    gzip on;
    gzip_types text/plain;
    gzip_min_length 0;
    server {
        listen %s:%d backlog=1024;
        root %s;
    }
}
""" % (workers, workdir, workdir, workdir, workdir, workdir, workdir, workdir,
                HOST, self.port, docroot))
        self.proc = subprocess.Popen(["nginx", "-c", conf, "-p", workdir, "-g", "daemon off;"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        on_exit(self.stop)
        wait_port(self.port, self.proc, "nginx")
        self.url = "http://%s:%d" % (HOST, self.port)

    def stop(self):
        stop_process(self.proc, 10, signal.SIGQUIT)
        if self.proc.poll() is None:
            self.proc.kill()


def fetch(port, path, headers=None, timeout=10.0):
    """GET http://127.0.0.1:PORT/PATH on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_port(port, proc, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            raise RuntimeError("%s exited with %s: %s" % (what, proc.returncode, err.strip()))
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not listen on %d" % (what, port))


# ---------------------------------------------------------------------------
# load generation


WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
"""

_wrk_lua_path = None


def have_wrk():
    return shutil.which("wrk") is not None


def _lua_path():
    global _wrk_lua_path
    if _wrk_lua_path is None:
        d = make_tempdir("stapexp-bench-wrk.")
        _wrk_lua_path = os.path.join(d, "report.lua")
        with open(_wrk_lua_path, "w") as f:
            f.write(WRK_LUA)
    return _wrk_lua_path


class LoadResult:
    def __init__(self, requests, duration, p50, p99, pmax, errors, bytes_=0, tool="wrk"):
        self.requests = requests
        self.duration = duration
        self.p50 = p50          # seconds
        self.p99 = p99
        self.max = pmax
        self.errors = errors    # non-2xx + socket errors
        self.bytes = bytes_
        self.tool = tool

    @property
    def rps(self):
        return self.requests / self.duration if self.duration else 0.0

    def as_dict(self):
        return {"rps": round(self.rps, 1), "p50_ms": round(self.p50 * 1e3, 3),
                "p99_ms": round(self.p99 * 1e3, 3), "max_ms": round(self.max * 1e3, 3),
                "requests": self.requests, "errors": self.errors}


def run_load(url, connections, duration, headers=None, threads=None, timeout=10.0,
             use_wrk=None):
    """Keep-alive load on URL; returns a LoadResult."""
    if use_wrk is None:
        use_wrk = have_wrk()
    if use_wrk:
        return _run_wrk(url, connections, duration, headers, threads, timeout)
    return _run_py(url, connections, duration, headers, timeout)


class LoadProcess:
    """Background load (wrk, or the Python client in a thread)."""

    def __init__(self, url, connections, duration, headers=None, timeout=10.0, threads=2):
        self.result = None
        self.error = None
        self._t = threading.Thread(target=self._run, daemon=True, args=(url, connections, duration),
                                   kwargs=dict(headers=headers, timeout=timeout, threads=threads))
        self._t.start()

    def _run(self, *a, **kw):
        try:
            self.result = run_load(*a, **kw)
        except Exception as exc:
            self.error = exc

    def join(self, timeout=None):
        self._t.join(timeout)
        if self.error:
            raise self.error
        return self.result


def _run_wrk(url, connections, duration, headers, threads, timeout):
    threads = threads or 1
    threads = min(threads, connections)
    # wrk takes whole seconds only
    duration = max(1, int(round(duration)))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", "%ds" % duration,
           "--timeout", "%ds" % max(1, int(round(timeout))), "-s", _lua_path()]
    for k, v in (headers or {}).items():
        cmd += ["-H", "%s: %s" % (k, v)]
    cmd.append(url)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    on_exit(lambda: proc.poll() is None and proc.kill())
    try:
        out, err = proc.communicate(timeout=duration + timeout + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON "):])
            errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
            return LoadResult(d["requests"], d["duration_us"] / 1e6, d["p50_us"] / 1e6,
                              d["p99_us"] / 1e6, d["max_us"] / 1e6, errors, d["bytes"])
    raise RuntimeError("wrk gave no result: %s %s" % (out.decode()[-500:], err.decode()[-500:]))


def _run_py(url, connections, duration, headers, timeout):
    """Fallback client: one thread per keep-alive connection (GIL-bound: it
    under-reports throughput compared to wrk)."""
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    lats = []
    counts = {"errors": 0, "bytes": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client():
        conn = None
        mine = []
        errs = 0
        nbytes = 0
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("GET", path, headers=headers or {})
                r = conn.getresponse()
                body = r.read()
                nbytes += len(body)
                if r.status != 200:
                    errs += 1
                if r.getheader("connection", "").lower() == "close" or r.version == 10:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                errs += 1
                if conn is not None:
                    conn.close()
                conn = None
                continue
            mine.append(time.perf_counter() - t0)
        if conn is not None:
            conn.close()
        with lock:
            lats.extend(mine)
            counts["errors"] += errs
            counts["bytes"] += nbytes

    t0 = time.monotonic()
    ts = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(duration + timeout + 5)
    elapsed = time.monotonic() - t0
    lats.sort()
    if not lats:
        return LoadResult(0, elapsed, 0, 0, 0, counts["errors"], 0, "python")
    return LoadResult(len(lats), elapsed, percentile(lats, 50), percentile(lats, 99), lats[-1],
                      counts["errors"], counts["bytes"], "python")


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


# ---------------------------------------------------------------------------
# output


def table(headers, rows):
    """Plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w)
                             for c, w in zip(r, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _numeric(text):
    return bool(re.match(r"^[-+]?[0-9.]+[%x]?$", text))


def ms(seconds):
    return "%.2f" % (seconds * 1e3)


def median(values):
    return statistics.median(values) if values else 0.0


def machine_line():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d CPUs (%s), Python %s, %s" % (os.cpu_count() or 0, model,
                                           sys.version.split()[0], time.strftime("%Y-%m-%d"))
