"""Harness for running the REAL SystemTap (BPF runtime) in tests.

Usage from tests (tests/ is on sys.path via conftest)::

    from realstap import skip_reason, prepare
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    rs = prepare(tmp_path / "rs")      # runs tools/stap-bpf-setup
    exporter_args = ["--stap", rs.stap]
    rs.write_wrapper_script(scripts_dir / "ticks.stp", TICKS)

Why each device exists (observed with Debian 12's systemtap 4.8 on machines
without kernel headers; "recipe step N" is the order in which they are set up):

* Only the BPF runtime works here: these machines have no kernel headers, so
  the default kernel-module runtime cannot compile anything.  The BPF runtime
  runs ``begin``/``end``/``timer.*``/``procfs`` probes (the ``prometheus``
  probe is a procfs probe); ``kprobe.*``, ``syscall.*`` and
  ``kernel.function`` probes are refused.  (recipe step 1)
* ``KB/`` -- a stand-in kernel build tree passed as ``stap -r KB``: stap
  refuses to start without a build tree for ``uname -r``.  (recipe step 2)
  ``tools/stap-bpf-setup`` also copies ``/proc/kallsyms`` to
  ``KB/System.map`` so that ``stap --runtime=kernel -p2`` can resolve
  kprobe-based probe points (``syscall.*`` falls back to ``nd_syscall.*``
  kprobes); that lets us *elaborate* kernel-runtime example scripts here.
  Its ``KB/.config`` is the running kernel's ``/proc/config.gz`` when there
  is one (with the options timer scripts need forced on), so that stap sees
  ``CONFIG_UPROBES`` and accepts user-space probes.
* debugfs on ``/sys/kernel/debug`` (and tracefs under it): stapbpf registers
  user-space probes through ``/sys/kernel/debug/tracing/uprobe_events``.
  ``tools/stap-bpf-setup`` mounts them when missing and says so on stderr
  (kept as ``RealStap.setup_messages``); ``uprobe_skip_reason()`` says why
  user-space probes cannot work when they cannot.  The mounts stay: other
  tests running at the same time may use them.
* ``setrlimit-shim.so`` in ``LD_PRELOAD`` -- stapbpf insists on raising
  RLIMIT_MEMLOCK and aborts with "could not increase map resource limit" in a
  sandbox without CAP_SYS_RESOURCE; modern kernels do not need the limit for
  BPF.  A test-harness device only.  (recipe step 3)
* The wrapper ``DIR/stap`` runs
  ``LD_PRELOAD=DIR/setrlimit-shim.so exec stap --runtime=bpf -r DIR/KB "$@"``
  so it can be handed to the exporter as ``--stap`` and needs no extra
  environment (``BPF_RUNTIME_ENV`` is empty).  (recipe step 4)
* The metrics appear in a FIFO ``/var/tmp/systemtap-$USER/MODULE/__prometheus``
  (not a regular file); a reader may see an immediate EOF between two write
  cycles, and a blocking open() with no writer blocks forever: ``read_fifo``
  opens with O_NONBLOCK, waits with select() and a deadline and retries empty
  reads.  ("What the runtime does")
* ``stap -m NAME`` leaves ``NAME.bo`` in its working directory: run it in a
  scratch directory.  SIGTERM to stap also stops stapbpf and removes the FIFO
  directory: ``stop`` signals the whole process group and waits.
"""

import ctypes
import errno
import os
import platform
import pwd
import select
import shlex
import shutil
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_TOOL = os.path.join(REPO, "tools", "stap-bpf-setup")
PROMETHEUS_TAPSET = "/usr/share/systemtap/tapset/prometheus.stpm"

# Extra environment the BPF runtime needs: none, the wrapper written by
# tools/stap-bpf-setup sets LD_PRELOAD itself.
BPF_RUNTIME_ENV = {}

# bpf(2) syscall numbers per machine (uname -m).
_BPF_SYSCALL_NR = {
    "x86_64": 321,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
    "i386": 357,
    "i686": 357,
    "armv7l": 386,
}

_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2

_cached_reason = None
_cached = False


def _probe_bpf():
    """Try BPF_MAP_CREATE of a 1-entry array map.  None if it works, else a reason."""
    machine = platform.machine()
    nr = _BPF_SYSCALL_NR.get(machine)
    if nr is None:
        return None  # unknown arch: cannot probe cheaply, let stap tell
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()  # union bpf_attr, zero-filled (128 bytes)
    attr[0] = _BPF_MAP_TYPE_ARRAY  # map_type
    attr[1] = 4  # key_size
    attr[2] = 4  # value_size
    attr[3] = 1  # max_entries
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(_BPF_MAP_CREATE),
                      ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        return ("the bpf() syscall is refused (BPF_MAP_CREATE of an array map failed: "
                "errno %d %s: %s); SystemTap's BPF runtime cannot load programs here"
                % (err, errno.errorcode.get(err, "?"), os.strerror(err)))
    os.close(fd)
    return None


def _compute_skip_reason():
    if os.geteuid() != 0:
        return "real SystemTap needs root (euid is %d, not 0)" % os.geteuid()
    for tool in ("stap", "stapbpf"):
        if shutil.which(tool) is None:
            return ("`%s` is not on PATH: install Debian's systemtap package "
                    "(apt-get install systemtap)" % tool)
    if not os.path.exists(PROMETHEUS_TAPSET):
        return ("the prometheus tapset %s is missing: install Debian's systemtap package"
                % PROMETHEUS_TAPSET)
    if shutil.which("gcc") is None:
        return "`gcc` is not on PATH (needed to build the setrlimit shim): apt-get install gcc"
    if not os.access(SETUP_TOOL, os.X_OK):
        return "%s is missing or not executable" % SETUP_TOOL
    return _probe_bpf()


def skip_reason():
    """None when the real BPF runtime can work here, else what exactly is missing.

    The result is cached for the life of the process."""
    global _cached_reason, _cached
    if not _cached:
        _cached_reason = _compute_skip_reason()
        _cached = True
    return _cached_reason


def fifo_path(module):
    """Where the BPF runtime puts MODULE's prometheus FIFO."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    return "/var/tmp/systemtap-%s/%s/__prometheus" % (user, module)


class RealStap:
    """A prepared directory: `.stap` wrapper, `.kb` build tree, `.shim`."""

    def __init__(self, directory, stap, setup_messages=""):
        self.directory = os.path.abspath(directory)
        self.stap = stap
        self.setup_messages = setup_messages
        self.kb = os.path.join(self.directory, "KB")
        self.shim = os.path.join(self.directory, "setrlimit-shim.so")
        self.env = dict(os.environ, **BPF_RUNTIME_ENV)

    def __repr__(self):
        return "RealStap(%r)" % self.directory

    def write_wrapper_script(self, path, script_text):
        """Write an executable `.stp` shell wrapper, as distributions ship them.

        The systemtap script itself goes to a sibling file `PATH.real` (which
        does not end in `.stp`, so the exporter does not list it); the wrapper
        runs `exec WRAPPER_STAP "$@" /abs/PATH.real`.  The exporter appends
        `-m MODULE` to the wrapper's arguments: "$@" comes before the script
        file, because arguments after the script file are the script's own
        arguments in stap's documented syntax (stap 4.8 happens to permute
        options after the file too, but we don't rely on that).
        Returns the path of the script file."""
        path = os.path.abspath(str(path))
        real = path + ".real"
        with open(real, "w") as f:
            f.write(script_text)
        text = ("#!/bin/sh\n"
                "# Generated by tests/realstap.py: runs the systemtap script next to it\n"
                "# with the real BPF runtime (options from the caller come first).\n"
                'exec %s "$@" %s\n' % (shlex.quote(self.stap), shlex.quote(real)))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        return real

    def elaborate(self, path, runtime="bpf", timeout=60):
        """Run `stap -p2` (parse + elaborate, nothing is compiled or loaded).

        PATH is a systemtap script or an executable wrapper written by
        write_wrapper_script (a file starting with `#!`).  runtime="kernel"
        elaborates for the kernel-module runtime instead (a later --runtime
        overrides the wrapper's --runtime=bpf).  `-v` makes stap list every
        error instead of "N similar error messages suppressed".
        Returns (returncode, stderr); returncode is -1 on timeout."""
        path = os.path.abspath(str(path))
        extra = ["-v", "-p2"]
        if runtime != "bpf":
            extra = ["--runtime=%s" % runtime] + extra
        with open(path, "rb") as f:
            is_wrapper = f.read(2) == b"#!"
        cmd = ([path] + extra) if is_wrapper else ([self.stap] + extra + [path])
        try:
            proc = subprocess.run(cmd, cwd=self.directory, env=self.env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode("utf-8", "replace") if e.stderr else ""
            return -1, "timed out after %ss: %s\n%s" % (timeout, " ".join(cmd), err)
        return proc.returncode, proc.stderr.decode("utf-8", "replace")

    def start(self, module, script, cwd, stderr=None):
        """Start `stap -m MODULE SCRIPT` in CWD, in its own process group.

        SCRIPT may be a plain .stp or a wrapper from write_wrapper_script.
        Always pair with stop()."""
        script = os.path.abspath(str(script))
        with open(script, "rb") as f:
            is_wrapper = f.read(2) == b"#!"
        cmd = ([script, "-m", module] if is_wrapper
               else [self.stap, "-m", module, script])
        return subprocess.Popen(cmd, cwd=str(cwd), env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr if stderr is not None else subprocess.PIPE,
                                start_new_session=True)


def prepare(directory):
    """Run tools/stap-bpf-setup into DIRECTORY and return a RealStap."""
    directory = os.path.abspath(str(directory))
    proc = subprocess.run([SETUP_TOOL, directory], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError("%s %s failed (exit %d): %s"
                           % (SETUP_TOOL, directory, proc.returncode,
                              proc.stderr.decode("utf-8", "replace").strip()))
    stap = proc.stdout.decode().strip().splitlines()[-1]
    return RealStap(directory, stap, proc.stderr.decode("utf-8", "replace"))


UPROBE_EVENTS = "/sys/kernel/debug/tracing/uprobe_events"
UPROBE_CONFIG = ("CONFIG_UPROBES=y", "CONFIG_UPROBE_EVENTS=y")


def uprobe_skip_reason(rs):
    """None when user-space probes can run with the prepared RS, else why not.

    Call after prepare(): tools/stap-bpf-setup has mounted debugfs by then
    if it could."""
    with open(os.path.join(rs.kb, ".config")) as f:
        config = f.read().splitlines()
    missing = [opt for opt in UPROBE_CONFIG if opt not in config]
    if missing:
        return ("the stand-in kernel tree's .config lacks %s (no /proc/config.gz "
                "saying the kernel has them): user-space probes cannot work"
                % ", ".join(missing))
    if not os.path.exists(UPROBE_EVENTS):
        return ("%s is missing although tools/stap-bpf-setup tried to mount debugfs "
                "(%s): stapbpf cannot register user-space probes"
                % (UPROBE_EVENTS, rs.setup_messages.strip() or "it said nothing"))
    return None


def read_fifo(path, timeout=10.0, proc=None):
    """Read one complete text from a stapbpf FIFO, never blocking forever.

    Opens with O_NONBLOCK (ENXIO/ENOENT: no FIFO/writer yet -> retry), waits
    for data with select() until the deadline, and retries when a cycle gives
    an immediate EOF with no data.  Returns the text; raises TimeoutError at
    the deadline (or RuntimeError if PROC exits meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("stap exited with %s before %s had data"
                               % (proc.returncode, path))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from %s within %ss" % (path, timeout))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            time.sleep(0.1)
            continue
        chunks = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
                if not ready:
                    if chunks:
                        break  # writer quiet after some data: done
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    break  # EOF: writer closed its end
                chunks.append(data)
        finally:
            os.close(fd)
        if chunks:
            return b"".join(chunks).decode("utf-8", "replace")
        time.sleep(0.1)  # empty cycle: retry


def stop(proc, timeout=15.0):
    """SIGTERM the process group of PROC (stap and stapbpf), wait; SIGKILL if needed."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
    # stapbpf may linger briefly after stap exits; give the group a moment
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
