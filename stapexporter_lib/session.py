"""One script's lifecycle: spawn, watchdog, keepalive, backoff, stop.

A ``Session`` owns at most one child process at a time.  Every state change
goes through ``Session._transition``, which checks it against
``states.TRANSITIONS``.  One watchdog greenlet per live script waits for
whichever comes first -- the child's exit, the keepalive deadline, or a stop
request -- and acts on it; it also sleeps through an autostart script's
backoff and restarts it.

Children run in their own process group (so a stop reaches everything a
script started), with stdin from /dev/null, in a private working directory
that is removed when they stop (stap leaves ``MODULE.bo``/``MODULE.ko``
there), and with ``PR_SET_PDEATHSIG`` so they are told to stop if the
exporter dies, even by SIGKILL.

This module knows nothing about HTTP: ``scrape()`` returns an ``Outcome``.
"""

import collections
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import tempfile
import time
from typing import Callable, Deque, List, Optional

import gevent
import gevent.event
import gevent.os
from gevent import subprocess

from . import compiled, procfs
from .catalog import Script
from .declarations import Annotator, parse_declarations
from .logs import escape_line  # noqa: F401  (moved to logs.py; re-exported for callers)
from .states import (BACKOFF, FAILED, RUNNING, SERVING_STATES, STARTABLE_STATES, STARTING,
                     STOPPED, STOPPING, TRANSITIONS)

log = logging.getLogger("stap-exporter")

STDERR_TAIL = 20
MAX_LINE = 4096
_PIPE_CHUNK = 65536
# How long a read that ended without a final newline waits to see whether
# the script died while writing.
_EXIT_NOTICE = 0.05

# Backoff for autostart scripts that exit: 1 s doubling to 60 s, back to 1 s
# once a run has lasted BACKOFF_RESET seconds.
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0
BACKOFF_RESET = 30.0

# While a request waits for a starting script, how often it looks for the
# output file (it also wakes at once when the script exits).
_LOCATE_INTERVAL = 0.05

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not Linux/glibc: no death signal
    _prctl = None


def set_child_subreaper() -> bool:
    """Make orphaned descendants (stapbpf after its stap died) our children,
    so gevent's child watcher reaps them and stops can wait for them."""
    return bool(_prctl) and _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _child_setup_for(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn for children of PARENT_PID.

    Runs in the forked child before exec: async-signal-safe calls only (the
    libc handle was loaded before the fork; nothing here touches gevent).
    SIGTERM rather than SIGKILL is the death signal because stap forwards it
    to stapbpf/staprun and removes its module directory; a SIGKILLed stap
    would orphan them.
    """
    def setup():
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            # The parent may have died between fork() and prctl(): the death
            # signal would then never come.
            if os.getppid() != parent_pid:
                os._exit(1)
    return setup


class Outcome:
    """What a scrape produced.  KIND is one of the constants below."""

    OK = "ok"                # BODY is the script's output
    NOT_READY = "not_ready"  # starting, restarting or stopping: try again soon
    FAILED = "failed"        # the script exited with an error: MESSAGE says why
    UNAVAILABLE = "unavailable"  # running, but its output could not be read
    BUSY = "busy"            # not started: a cap on running or starting scripts

    __slots__ = ("kind", "body", "message", "retry_after")

    def __init__(self, kind: str, body: bytes = b"", message: str = "",
                 retry_after: Optional[float] = None):
        self.kind = kind
        self.body = body
        self.message = message
        self.retry_after = retry_after

    def __repr__(self):
        return "Outcome(%s, %r)" % (self.kind, self.message or self.body[:40])


class SessionConfig:
    """What a session needs from the exporter's configuration."""

    def __init__(self, stap: List[str], procfs_dirs: List[str],
                 keepalive: Optional[float] = None, start_wait: float = 1.0,
                 stop_grace: float = 5.0, workdir_root: Optional[str] = None,
                 max_output: int = procfs.DEFAULT_MAX_BYTES, module_cache=None):
        self.stap = stap
        self.procfs_dirs = procfs_dirs
        self.keepalive = keepalive
        self.start_wait = start_wait
        self.stop_grace = stop_grace
        self.workdir_root = workdir_root or tempfile.gettempdir()
        self.max_output = max_output
        self.module_cache = module_cache  # compiled.ModuleCache, or None


def describe_exit(returncode: Optional[int]) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal %d" % -returncode
        return "killed by %s" % name
    return "exit status %d" % returncode


class Session:
    """The lifecycle of one script."""

    def __init__(self, script: Script, config: SessionConfig,
                 clock: Callable[[], float] = time.monotonic,
                 popen=subprocess.Popen, admit: Optional[Callable[["Session"], Optional[str]]] = None):
        self.script = script
        self._admit = admit
        self.config = config
        self.clock = clock
        self._popen = popen
        self.state = STOPPED
        self.proc = None
        self.pid: Optional[int] = None
        self.started_at: Optional[float] = None  # clock() of the last spawn
        self.starts = 0
        self.restarts = 0
        self.exits = collections.Counter()  # outcome -> count
        self.last_error: Optional[str] = None
        self.stderr_tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.last_request = clock()
        self.backoff_until: Optional[float] = None
        self._backoff = BACKOFF_FIRST
        self._stop_requested = False
        self._wake = gevent.event.Event()
        self._changed = gevent.event.Event()
        self._watchdog: Optional[gevent.Greenlet] = None
        self._stderr_reader: Optional[gevent.Greenlet] = None
        self._stdout_reader: Optional[gevent.Greenlet] = None
        self._workdir: Optional[str] = None
        self._output_path: Optional[str] = None
        self._flight: Optional[gevent.event.AsyncResult] = None
        self.last_output_bytes = 0
        self._utf8_warned = False
        self._digest: Optional[str] = None    # of the script file at the last spawn
        self._from_cache = False               # this run uses a kept compiled module
        self._produced = False                 # this run's output has been read
        self._annotator: Optional[Annotator] = None

    # -- public -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self.script.name

    @property
    def live(self) -> bool:
        """True while a process exists or a restart is pending."""
        return self._watchdog is not None

    def uptime(self) -> Optional[float]:
        if self.state in (STARTING, RUNNING) and self.started_at is not None:
            return self.clock() - self.started_at
        return None

    def touch(self) -> None:
        """A request arrived: reset the keepalive clock."""
        self.last_request = self.clock()

    def start(self) -> None:
        """Start the script if it is stopped (or failed); otherwise nothing.
        The process is spawned by the session's watchdog greenlet."""
        if self.state not in STARTABLE_STATES:
            return
        self._stop_requested = False
        self._backoff = BACKOFF_FIRST
        self._transition(STARTING)
        self._watchdog = gevent.spawn(self._watch)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the script (SIGTERM, then SIGKILL after the grace) and wait
        for it, at most TIMEOUT seconds (default: grace plus a margin)."""
        watchdog = self._watchdog
        if watchdog is None:
            return
        self._stop_requested = True
        self._wake.set()
        watchdog.join(timeout if timeout is not None else self.stop_budget())

    def stop_budget(self) -> float:
        """The longest a stop can take: SIGTERM grace, SIGKILL wait, then the
        grace again for what is left of the process group."""
        return 2 * self.config.stop_grace + 5 + 1

    def scrape(self, timeout: float) -> Outcome:
        """Answer one request: start the script if needed, and read its output
        if it is readable within the deadline (a starting script gets at most
        ``start_wait`` seconds)."""
        self.touch()
        if self.state == FAILED:
            # Report the failure once; the next request starts afresh.
            outcome = Outcome(Outcome.FAILED, message=self.failure_report())
            self._transition(STOPPED)
            return outcome
        if self.state in STARTABLE_STATES:
            refusal = self._admit(self) if self._admit is not None else None
            if refusal:
                return Outcome(Outcome.BUSY, message=refusal, retry_after=5)
            self.start()
        if self.state == STOPPING:
            return Outcome(Outcome.NOT_READY, message="The script is stopping; it will start"
                           " again on the next request.", retry_after=1)
        if self.state == BACKOFF:
            wait = max(0.0, (self.backoff_until or 0) - self.clock())
            return Outcome(Outcome.NOT_READY, message="The script exited (%s) and will be"
                           " restarted in %.0f s.\n%s" % (self.last_error or "",
                                                          wait, self._tail_text()),
                           retry_after=max(1, round(wait)))
        return self._read_live(timeout)

    def failure_report(self) -> str:
        text = "The script %s failed: %s." % (self.name, self.last_error or "unknown error")
        tail = self._tail_text()
        if tail:
            text += "\nLast lines of its standard error:\n" + tail
        return text

    # -- reading ----------------------------------------------------------

    def _read_live(self, timeout: float) -> Outcome:
        starting = self.state == STARTING
        budget = min(timeout, self.config.start_wait) if starting else timeout
        deadline = self.clock() + budget
        while True:
            path = self._locate()
            if path is not None:
                try:
                    data = self.read_output(max(0.0, deadline - self.clock()))
                except FileNotFoundError:
                    self._output_path = None
                except procfs.OutputTimeout as exc:
                    if self.state == STARTING:
                        return self._not_ready()
                    return Outcome(Outcome.UNAVAILABLE, message=str(exc), retry_after=1)
                except procfs.OutputError as exc:
                    return Outcome(Outcome.UNAVAILABLE, message=str(exc), retry_after=1)
                else:
                    if self.state == STARTING:
                        self._transition(RUNNING)
                    self._produced = True
                    return Outcome(Outcome.OK, body=data)
            if self.state not in SERVING_STATES:
                # It exited (or is being stopped) while we waited.
                return self.scrape(timeout) if self.state != STOPPED else self._not_ready()
            remaining = deadline - self.clock()
            if remaining <= 0:
                if self.state == STARTING:
                    return self._not_ready()
                return Outcome(Outcome.UNAVAILABLE, retry_after=1,
                               message="The script is running but its output file"
                               " (%s/__prometheus) is missing." % self.script.module)
            self._changed.wait(min(_LOCATE_INTERVAL, remaining))

    def _not_ready(self) -> Outcome:
        return Outcome(Outcome.NOT_READY, retry_after=2,
                       message="The script %s is starting (systemtap may be compiling it)."
                       % self.name)

    def _locate(self) -> Optional[str]:
        if self._output_path is None and self.state in SERVING_STATES:
            self._output_path = procfs.find_output(self.script.module, self.config.procfs_dirs)
        return self._output_path

    def read_output(self, timeout: float) -> bytes:
        """Read the output, sharing one read among concurrent callers
        (single-flight): reads of one script are serialized, and a FIFO never
        sees two readers at once."""
        flight = self._flight
        if flight is not None:
            try:
                return flight.get(timeout=timeout)
            except gevent.Timeout:
                raise procfs.OutputTimeout("timed out waiting for the script's output") from None
        flight = self._flight = gevent.event.AsyncResult()
        try:
            data = procfs.read_output(self._output_path, timeout, self.config.max_output,
                                      self.clock)
            if self._died_while_writing(data):
                raise procfs.OutputError("the script exited while writing its output")
            data = self._finish(data)
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, Exception)
                                 else procfs.OutputError("read aborted"))
            raise
        else:
            flight.set(data)
            return data
        finally:
            self._flight = None

    def _died_while_writing(self, data: bytes) -> bool:
        """True if the process ended as its output was read: the text may be
        cut short.  A text that does not end with a newline is suspect, so
        then wait a moment for an exit to be noticed."""
        proc = self.proc
        if proc is None:
            return False
        if not proc.result.ready() and data and not data.endswith(b"\n"):
            proc.result.wait(_EXIT_NOTICE)
        return proc.result.ready()

    def _finish(self, data: bytes) -> bytes:
        """Complete the last line, add declared HELP/TYPE lines."""
        if data and not data.endswith(b"\n"):
            data += b"\n"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # We promise charset=utf-8: replace what is not (an odd process
            # name in a label, say) rather than fail the whole scrape.
            if not self._utf8_warned:
                log.warning("output: script=%s pid=%s output is not valid UTF-8 (%s at byte"
                            " %d); invalid bytes are replaced", self.name, self.pid,
                            exc.reason, exc.start)
                self._utf8_warned = True
            data = data.decode("utf-8", "replace").encode("utf-8")
        if self._annotator:
            data = self._annotator.annotate(data)
        self.last_output_bytes = len(data)
        return data

    def _read_script(self) -> None:
        """Read the script file (in the thread pool): its digest keys the
        compiled-module cache, its ``// prometheus: TYPE/HELP`` comments give
        the declarations."""
        def read():
            with open(self.script.path, "rb") as f:
                return f.read(4 * 1024 * 1024)
        try:
            content = gevent.get_hub().threadpool.apply(read)
        except OSError as exc:
            log.warning("declarations: script=%s cannot read the script: %s", self.name,
                        exc.strerror)
            self._annotator = None
            self._digest = None
            return
        self._digest = compiled.digest(content)
        annotator = Annotator(parse_declarations(content.decode("utf-8", "replace")))
        self._annotator = annotator if annotator else None

    # -- lifecycle (runs in the watchdog greenlet) -------------------------

    def _transition(self, new: str) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise RuntimeError("%s: invalid transition %s -> %s" % (self.name, old, new))
        self.state = new
        log.debug("state: script=%s %s -> %s", self.name, old, new)
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()

    def _argv(self) -> List[str]:
        module_args = ["-m", self.script.module]
        self._from_cache = False
        if self.script.is_executable():
            return [self.script.path] + module_args
        cache = self.config.module_cache
        if cache is not None and self._digest is not None:
            kept = cache.argv(self.script.module, self._digest)
            if kept is not None:
                self._from_cache = True
                return kept
        return list(self.config.stap) + module_args + [self.script.path]

    def _spawn(self) -> None:
        """Fork the process of a STARTING session.  On failure to spawn:
        FAILED (or BACKOFF for autostart)."""
        self._output_path = None
        self._produced = False
        self._utf8_warned = False
        self.stderr_tail.clear()
        # A stale FIFO from an earlier run that died unseen would be read
        # instead of the new one (and never answer): start from a clean slate.
        for directory in self._remove_module_dirs():
            log.warning("stale: script=%s removed %s left by an earlier run", self.name,
                        directory)
        self._read_script()
        argv = self._argv()
        try:
            self._workdir = tempfile.mkdtemp(
                prefix="stap-exporter.%d.%s." % (os.getpid(), self.script.module),
                dir=self.config.workdir_root)
            env = dict(os.environ)
            env["TMPDIR"] = self._workdir  # stap's own temporary files go there too
            proc = self._popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=self._workdir, env=env,
                               close_fds=True, start_new_session=True,
                               preexec_fn=_child_setup_for(os.getpid()))
        except OSError as exc:
            self.last_error = "cannot run %s: %s" % (argv[0], exc.strerror or exc)
            log.error("spawn-failed: script=%s %s", self.name, self.last_error)
            self.stderr_tail.append(self.last_error)
            self.exits["spawn_error"] += 1
            self._remove_workdir()
            self._after_exit(uptime=0.0)
            return
        self.proc = proc
        self.pid = proc.pid
        self.started_at = self.clock()
        self.starts += 1
        self.last_error = None
        log.info("spawned: script=%s pid=%d module=%s argv=%s", self.name, proc.pid,
                 self.script.module, escape_line(" ".join(argv)))
        self._stderr_reader = gevent.spawn(self._pump, proc.stderr, True)
        self._stdout_reader = gevent.spawn(self._pump, proc.stdout, False)

    def _pump(self, stream, is_stderr: bool) -> None:
        """Log a child's output line by line; keep stderr's tail.  Reads the
        pipe in chunks, cooperatively, and yields between chunks, so neither
        a chatty child (never blocked on a full pipe) nor its output (never
        hogging the hub) holds anything up.  Stdout is only split into lines
        when debug logging will show it."""
        pid = self.pid
        fd = stream.fileno()
        gevent.os.make_nonblocking(fd)
        pending = b""
        try:
            while True:
                chunk = gevent.os.nb_read(fd, _PIPE_CHUNK)
                if not chunk:
                    break
                if not is_stderr and not log.isEnabledFor(logging.DEBUG):
                    continue
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) > MAX_LINE:
                    lines.append(pending[:MAX_LINE])
                    pending = b""
                for line in lines:
                    self._log_output_line(line[:MAX_LINE], is_stderr, pid)
                gevent.sleep(0)
            if pending:
                self._log_output_line(pending[:MAX_LINE], is_stderr, pid)
        except OSError:
            return
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _log_output_line(self, line: bytes, is_stderr: bool, pid) -> None:
        text = escape_line(line.decode("utf-8", "replace").rstrip("\r"))
        if is_stderr:
            self.stderr_tail.append(text)
            log.info("stderr: script=%s pid=%s %s", self.name, pid, text)
        else:
            log.debug("stdout: script=%s pid=%s %s", self.name, pid, text)

    def _watch(self) -> None:
        try:
            while True:
                if self.state == BACKOFF:
                    if self._sleep_backoff():
                        self._transition(STOPPED)
                        return
                    self.restarts += 1
                    self._transition(STARTING)
                if self.state == STARTING and self.proc is None:
                    self._spawn()
                    continue
                if self.state not in (STARTING, RUNNING):
                    return
                event = self._wait_live()
                if event == "exit":
                    self._handle_exit()
                else:
                    self._terminate(event)
        except BaseException:
            log.exception("watchdog-crashed: script=%s", self.name)
            self._kill_group(signal.SIGKILL)
            raise
        finally:
            self._watchdog = None
            self._wake.clear()

    def _wait_live(self) -> str:
        """Block until the process exits ("exit"), a stop is requested
        ("stop"), or the keepalive period passes without requests ("idle")."""
        keepalive = self.config.keepalive
        while True:
            if self._stop_requested:
                return "stop"
            timeout = None
            if keepalive is not None and not self.script.autostart:
                timeout = self.last_request + keepalive - self.clock()
                if timeout <= 0:
                    return "idle"
            gevent.wait([self.proc.result, self._wake], timeout=timeout, count=1)
            if self.proc.result.ready() and not self._stop_requested:
                return "exit"
            self._wake.clear()

    def _sleep_backoff(self) -> bool:
        """Sleep until the backoff ends; True if a stop came first."""
        while not self._stop_requested:
            remaining = (self.backoff_until or 0) - self.clock()
            if remaining <= 0:
                return False
            self._wake.wait(remaining)
            self._wake.clear()
        return True

    def _handle_exit(self) -> None:
        proc = self.proc
        uptime = self.clock() - (self.started_at or self.clock())
        if self._from_cache and not self._produced and not self._stop_requested:
            # The kept module would not run (a changed kernel or runtime, say):
            # forget it and compile afresh, without bothering the client.
            log.warning("cache: script=%s pid=%d compiled module failed (%s); recompiling",
                        self.name, proc.pid, describe_exit(proc.returncode))
            self.config.module_cache.drop(self.script.module)
            self._end_run()
            return  # still STARTING: the watchdog spawns the full compile
        self._end_run()
        self.last_error = describe_exit(proc.returncode)
        self.exits["error" if proc.returncode != 0 else "exited"] += 1
        log.warning("exited: script=%s pid=%d (%s; not expected)", self.name, proc.pid,
                    self.last_error)
        self._after_exit(uptime)

    def _after_exit(self, uptime: float) -> None:
        if self.script.autostart and not self._stop_requested:
            if uptime >= BACKOFF_RESET:
                self._backoff = BACKOFF_FIRST
            delay = self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_CAP)
            self.backoff_until = self.clock() + delay
            log.info("backoff: script=%s restarting in %.0f s after %s", self.name, delay,
                     self.last_error)
            self._transition(BACKOFF)
        else:
            self._transition(FAILED)

    def _terminate(self, reason: str) -> None:
        proc = self.proc
        self._transition(STOPPING)
        log.info("stopping: script=%s pid=%d reason=%s", self.name, proc.pid,
                 "idle for %gs" % self.config.keepalive if reason == "idle" else reason)
        self._kill_group(signal.SIGTERM)
        proc.result.wait(self.config.stop_grace)
        if not proc.result.ready():
            log.warning("kill: script=%s pid=%d did not stop within %g s; sending SIGKILL",
                        self.name, proc.pid, self.config.stop_grace)
            self._kill_group(signal.SIGKILL)
            proc.result.wait(5)
        self._end_run()
        self.exits["stopped"] += 1
        log.info("stopped: script=%s pid=%d (%s)", self.name, proc.pid,
                 describe_exit(proc.returncode))
        self._transition(STOPPED)

    def _end_run(self) -> None:
        """What every end of a run needs, whatever ended it: drain the output
        readers, stop what is left of the process group, keep the compiled
        module if it is worth keeping, remove the run's files, and forget the
        process."""
        self._join_readers()
        self._kill_stragglers()
        self._keep_compiled()
        self._remove_leftovers()
        self.proc = None
        self.pid = None

    def _kill_group(self, sig: int) -> bool:
        """Signal the script's process group; False when it is gone."""
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _kill_stragglers(self) -> None:
        """After the group leader is gone, give what is left of its group
        (a wrapper's children) a chance to stop cleanly, then kill it."""
        if not self._kill_group(signal.SIGTERM):
            return
        deadline = self.clock() + self.config.stop_grace
        while self.clock() < deadline:
            gevent.sleep(0.05)
            if not self._kill_group(0):
                return
        log.warning("kill: script=%s process group %d outlived its leader; sending SIGKILL",
                    self.name, self.pid)
        self._kill_group(signal.SIGKILL)

    def _join_readers(self) -> None:
        readers = [g for g in (self._stderr_reader, self._stdout_reader) if g is not None]
        gevent.joinall(readers, timeout=1.0)
        for g in readers:
            g.kill(block=False)
        self._stderr_reader = self._stdout_reader = None

    def _keep_compiled(self) -> None:
        """After a full compile that produced output, keep the module for the
        next start (not when stopping for good)."""
        cache = self.config.module_cache
        if (cache is not None and self._workdir and self._produced and not self._from_cache
                and not self._stop_requested  # shutting down: no next start to speed up
                and self._digest is not None and not self.script.is_executable()):
            if cache.keep(self.script.module, self._digest, self._workdir):
                log.info("cache: script=%s kept the compiled module for the next start",
                         self.name)

    def _remove_leftovers(self) -> None:
        """Remove the private working directory and any module directory the
        runtime failed to remove (the BPF runtime's FIFO directory after a
        SIGKILL)."""
        self._remove_workdir()
        self._remove_module_dirs()
        self._output_path = None

    def _remove_module_dirs(self) -> List[str]:
        """Remove this module's directories outside /proc (whose entries
        belong to the kernel); returns what was removed."""
        removed = []
        for directory in procfs.module_dirs(self.script.module, self.config.procfs_dirs):
            if not directory.startswith("/proc/"):
                _rmtree(directory)
                removed.append(directory)
        return removed

    def _remove_workdir(self) -> None:
        if self._workdir:
            _rmtree(self._workdir)
            self._workdir = None

    def _tail_text(self) -> str:
        return "\n".join(self.stderr_tail)


def _rmtree(path: str) -> None:
    """shutil.rmtree in the hub's thread pool, errors logged, never raised."""
    def remove():
        shutil.rmtree(path, ignore_errors=False)
    try:
        gevent.get_hub().threadpool.apply(remove)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cleanup: cannot remove %s: %s", path, exc.strerror)
