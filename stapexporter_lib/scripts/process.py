"""A script's processes: spawn, output pumps, signals, reaping, and the
files a run leaves.

Each process is forked in its own process group (a stop reaches everything
a script started), with stdin from /dev/null, in the start's private working
directory, and with ``PR_SET_PDEATHSIG`` so that it is told to stop if the
exporter dies, even by SIGKILL.  Its stdout and stderr are pumped into the
log.  Every signal goes through the injected seams (``killpg``/``kill``,
and once the leader is reaped ``signal_members``: ``pgroup.py``) and every
wait through the injected ``wait`` (``Seams``), so tests drive fake
processes on a fake clock and never signal a real process by a fake pid.
"""

import ctypes
import logging
import os
import signal
import time
from typing import Any, Callable, Deque, List, Optional, Sequence, Set, Tuple

import gevent
import gevent.os
from gevent import subprocess

from .. import trust
from ..logs import escape_line
from ..offhub import in_pool
from . import naming, output, pgroup

log = logging.getLogger("stap-exporter")

# Longest line of a child's stdout/stderr logged; the rest is cut.
MAX_LINE = 4096
# How much of a child's pipe is read at once.
PIPE_CHUNK = 65536
# How long a SIGKILLed process group leader gets to be reaped.
KILL_WAIT = 5.0
# How long the pipe pumps get to drain a finished child's last output.
PUMP_JOIN = 1.0
# How often the rest of a process group is checked for while it stops.
STRAGGLER_POLL = 0.05

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

try:
    _libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not Linux/glibc: no death signal
    _prctl = None

# wait(objects, timeout): block until one of OBJECTS (gevent events or
# results) is ready or TIMEOUT seconds pass; returns the ready ones.
Waiter = Callable[[Sequence[Any], Optional[float]], Sequence[Any]]


def wait_any(objects: Sequence[Any], timeout: Optional[float]) -> Sequence[Any]:
    """The real ``Waiter``: gevent's wait for the first ready object; a plain
    cooperative sleep when there are no objects."""
    if not objects:
        gevent.sleep(timeout or 0)
        return []
    return gevent.wait(objects, timeout=timeout, count=1)


# signal_members(pgid, sig): (pids signalled, members refused) -- pgroup's.
MemberSignaller = Callable[[int, int], Tuple[List[int], List[pgroup.Refused]]]


class Seams:
    """The operating system as a session sees it: the clock, waiting,
    forking and signalling a process group.  Tests substitute fakes.

    ``unreaped`` and ``signal_members`` default to pgroup's; with a
    ``killpg`` of its own (a fake process world) a group is signalled
    through it, as a whole, until it says the group is gone."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wait: Waiter = wait_any,
                 popen: Callable[..., Any] = subprocess.Popen,
                 killpg: Callable[[int, int], None] = os.killpg,
                 kill: Callable[[int, int], None] = os.kill,
                 unreaped: Optional[Callable[[int], bool]] = None,
                 signal_members: Optional[MemberSignaller] = None):
        self.clock, self.wait, self.popen, self.killpg, self.kill = clock, wait, popen, killpg, kill
        real = killpg is os.killpg
        self.unreaped = unreaped or (pgroup.unreaped if real else lambda pid: True)
        self.signal_members = signal_members or (
            _members_off_hub if real else _whole_group(killpg))


def _members_off_hub(pgid: int, sig: int):
    """pgroup.signal_members in the hub's thread pool: it reads all of /proc."""
    return in_pool(pgroup.signal_members, pgid, sig)


def _whole_group(killpg: Callable[[int, int], None]) -> MemberSignaller:
    """A MemberSignaller that signals the group through KILLPG, as one."""
    def signal_members(pgid: int, sig: int):
        try:
            killpg(pgid, sig)
            return [pgid], []
        except (ProcessLookupError, PermissionError):
            return [], []
    return signal_members


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


class Process:
    """One process of a script's start (a compile, a loader, a wrapper, the
    stap driver), from spawn to reaping."""

    def __init__(self, name: str, kind: str, stderr_tail: Deque[str], seams: Seams):
        self.name = name
        self.kind = kind  # compile, load, wrapper, driver: for the log
        self.stderr_tail = stderr_tail  # the session's: stderr lines are added to it
        self._os = seams
        self.proc = None
        self.workdir: Optional[str] = None
        self.spawned_at = 0.0  # the seams' clock() when the process was forked
        self._pumps: List[gevent.Greenlet] = []
        self._refused: Set[int] = set()  # pids of the group left alone, each logged once

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    @property
    def result(self):
        """Ready once the process has exited (gevent's ``Popen.result``)."""
        return self.proc.result

    def exited(self) -> bool:
        return self.proc.result.ready()

    def exited_unreaped(self) -> bool:
        """True once the process has exited, even while the hub has not yet
        reaped it (on a busy machine the child watcher can lag well behind
        the exit): the zombie is looked at without being reaped."""
        if self.exited():
            return True
        try:
            return os.waitid(os.P_PID, self.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped already, and then ``exited()`` says so
            return self.exited()

    def spawn(self, argv: List[str], workdir: str) -> None:
        """Fork ARGV in WORKDIR (also its TMPDIR: stap's temporary files go
        there) and start pumping its output.  Raises OSError."""
        self.workdir = workdir
        env = dict(os.environ)
        env["TMPDIR"] = workdir
        self.proc, out, err = self._popen(argv, env)
        self.spawned_at = self._os.clock()
        self._pumps = [gevent.spawn(self._pump, err, True), gevent.spawn(self._pump, out, False)]

    def _popen(self, argv: List[str], env: dict):
        """(process, stdout, stderr): the child forked on pipes of our own
        (raw descriptors, which cost less to set up than Popen's file
        objects; the child gets the write ends)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = self._os.popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                  cwd=self.workdir, env=env, close_fds=True,
                                  start_new_session=True,
                                  preexec_fn=_child_setup_for(os.getpid()))
        except BaseException:
            for fd in (out_r, err_r):
                trust.close_now(fd)
            raise
        finally:
            for fd in (out_w, err_w):
                trust.close_now(fd)
        return proc, out_r, err_r

    def _pump(self, fd: int, is_stderr: bool) -> None:
        """Log a child's output line by line; keep stderr's tail.  Reads the
        pipe in chunks, cooperatively, and yields between chunks, so neither
        a chatty child (never blocked on a full pipe) nor its output (never
        hogging the hub) holds anything up.  Stdout is only split into lines
        when debug logging will show it."""
        pid = self.pid
        gevent.os.make_nonblocking(fd)
        pending = b""
        try:
            while True:
                chunk = gevent.os.nb_read(fd, PIPE_CHUNK)
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
            trust.close_now(fd)

    def _log_output_line(self, line: bytes, is_stderr: bool, pid) -> None:
        text = escape_line(line.decode("utf-8", "replace").rstrip("\r"))
        if is_stderr:
            self.stderr_tail.append(text)
            log.info("stderr: script=%s pid=%s %s", self.name, pid, text)
        else:
            log.debug("stdout: script=%s pid=%s %s", self.name, pid, text)

    def signal_group(self, sig: int) -> bool:
        """Signal the process group; False when nothing of it is left that is
        provably ours.  While the leader is unreaped, its group id is still
        ours: the group is signalled as a whole.  After that, anyone may take
        the id for a group of their own once the last member is gone: each
        member is signalled alone, if it descends from the exporter."""
        if self.proc is None:
            return False
        if self._unreaped():
            try:
                self._os.killpg(self.pid, sig)
                return True
            except (ProcessLookupError, PermissionError):
                return False
        signalled, refused = self._os.signal_members(self.pid, sig)
        for member in refused:
            if member.pid not in self._refused:
                self._refused.add(member.pid)
                log.warning("kill: script=%s pid=%d pgid=%d not signalled: %s %s",
                            self.name, member.pid, self.pid, member.comm or "the process",
                            member.reason)
        return bool(signalled)

    def _unreaped(self) -> bool:
        """The leader is our child and not yet reaped, so its pid and group id
        are still its own.  Asked of the kernel, and to be acted on before
        anything yields to the hub: gevent's child watcher reaps it there,
        possibly before its result is set."""
        return not self.exited() and self._os.unreaped(self.pid)

    def signal_leader(self, sig: int) -> None:
        """Signal the group leader alone, if it is our unreaped child."""
        if self.proc is None or not self._unreaped():
            return
        try:
            self._os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self, grace: float) -> None:
        """SIGTERM the group leader, and SIGKILL the group if the leader is
        still there after GRACE seconds; returns once it exited (or KILL_WAIT
        passed).  The leader alone at first: stap forwards the signal to its
        loader (stapbpf/staprun), and a loader signalled twice can abort its
        ``probe end`` handlers ("received interrupt during exit probe",
        signal 6).  What is left of the group is stopped after the leader
        (``reap``)."""
        self.signal_leader(signal.SIGTERM)
        self._os.wait([self.result], grace)
        if not self.exited():
            log.warning("kill: script=%s pid=%d did not stop within %g s; sending SIGKILL",
                        self.name, self.pid, grace)
            self.signal_group(signal.SIGKILL)
            self._os.wait([self.result], KILL_WAIT)

    def reap(self, grace: float) -> None:
        """After the leader is gone: drain the output pumps, then give what is
        left of its group (a wrapper's children) GRACE seconds to stop
        cleanly, then kill it."""
        self._join_pumps()
        if not self.signal_group(signal.SIGTERM):
            return
        deadline = self._os.clock() + grace
        while self.signal_group(0):
            if self._os.clock() >= deadline:
                break
            self._os.wait((), STRAGGLER_POLL)
        else:
            return
        log.warning("kill: script=%s process group %d outlived its leader; sending SIGKILL",
                    self.name, self.pid)
        self.signal_group(signal.SIGKILL)

    def _join_pumps(self) -> None:
        gevent.joinall(self._pumps, timeout=PUMP_JOIN)
        for g in self._pumps:
            g.kill(block=False)
        self._pumps = []

def stop_budget(grace: float) -> float:
    """The longest a stop can take: SIGTERM grace and the SIGKILL wait for
    the leader, the pumps' drain, then the grace again for what is left of
    the process group."""
    return grace + KILL_WAIT + PUMP_JOIN + grace


def remove_module_dirs(module: str, procfs_dirs: List[str]) -> List[str]:
    """Remove MODULE's directories outside /proc (whose entries belong to the
    kernel); returns what was removed."""
    removed = []
    for directory in output.module_dirs(module, procfs_dirs):
        if not naming.kernel_owned(directory) and rmtree(directory):
            removed.append(directory)
    return removed


def rmtree(path: str) -> bool:
    """trust.remove_tree in the hub's thread pool (no link followed, nothing
    foreign removed, any depth); True if PATH was removed.  Errors are logged,
    never raised: clean-up must not end a watchdog."""
    try:
        in_pool(trust.remove_tree, path)
        return True
    except FileNotFoundError:
        pass
    except trust.Untrusted as exc:
        log.warning("cleanup: refused to remove %s; left alone", escape_line(str(exc)))
    except OSError as exc:
        log.warning("cleanup: cannot remove %s: %s", escape_line(path), exc.strerror)
    except Exception as exc:  # noqa: BLE001 -- clean-up must never end a watchdog
        log.warning("cleanup: cannot remove %s: %s", escape_line(path), exc)
    return False
