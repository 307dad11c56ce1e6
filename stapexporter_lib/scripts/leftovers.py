"""Clean-up after an exporter that died without stopping its scripts.

Module names carry the owning exporter's pid (``stapexp_<pid>_...``) and
working directories are ``stap-exporter.<pid>.*``.  At start-up, what a dead
exporter left is ours to clean: processes still working in one of its private
working directories, the BPF runtime's module directories, and the private
working directories themselves.  Leftovers of a live exporter are never
touched.

A name alone proves nothing: any local user can name a directory or a
process like ours, and root programs such as runuser, su or sudo carry a
user's words in their command line.  So command lines are never read, and a
process counts only if root (or our user) owns its /proc entry -- checked
before anything of it is read -- and it works in a dead exporter's private
working directory: a root-owned mode-0700 directory directly in the
temporary directory, which only root can make or enter.  Every process an
exporter starts begins there and stap, staprun, stapio and stapbpf stay
there.  The process half is kept because the other safeguards do not cover
everything: the death signal (PR_SET_PDEATHSIG) reaches only the exporter's
children and only as a SIGTERM a script may ignore, orphans the exporter
reaped as a child subreaper go to init when it dies, and the unit's
KillMode=control-group helps only under systemd.

A directory entry is looked at only if root (or our user) owns it (lstat,
before anything else), and removed through directory descriptors without
following links (trust.remove_tree).  Processes are signalled through
pidfds, so a pid that was reused after its process exited is never
signalled; without pidfds, the process's start time is checked again right
before each signal.  The work is bounded whatever others plant: at most
MAX_ENTRIES entries of each directory (and of /proc) are looked at, and
refusals beyond the first MAX_LOGGED are only counted.

Runs once, before the server accepts connections; never raises.
"""

import logging
import os
import re
import select
import signal
import stat
import tempfile
import time
from typing import Iterable, Iterator, List, Optional

import gevent

from .. import trust
from ..offhub import in_pool
from .naming import MODULE_RE, WORKDIR_RE as _WORKDIR_RE, kernel_owned, owner_pid

log = logging.getLogger("stap-exporter")

# How long stopped processes get after SIGTERM, and then after SIGKILL.
SWEEP_GRACE = 2.0
_POLL_INTERVAL = 0.05
# A private working directory is made by mkdtemp: no access for others.
_PRIVATE_BITS = 0o077
# The most entries looked at in one directory (about 0.2 s of lstat calls).
MAX_ENTRIES = 50_000
# The most refusals logged one by one in a sweep.
MAX_LOGGED = 10


def _alive(pid: int) -> bool:
    """True if PID exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_time(proc_dir: str) -> Optional[str]:
    """Field 22 of /proc/PID/stat: with the pid, it identifies a process."""
    try:
        with open(os.path.join(proc_dir, "stat")) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def _shown(path: str) -> str:
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Refusals:
    """Logs the first MAX_LOGGED look-alikes left alone and counts the rest."""

    def __init__(self):
        self.count = 0

    def note(self, fmt: str, path: str, *args) -> None:
        self.count += 1
        if self.count <= MAX_LOGGED:
            log.warning("leftovers: " + fmt, _shown(path), *args)

    def summary(self) -> None:
        if self.count > MAX_LOGGED:
            log.warning("leftovers: left %d more look-alikes alone (not logged one by one)",
                        self.count - MAX_LOGGED)


def _entries(directory: str) -> Iterator["os.DirEntry[str]"]:
    """The first MAX_ENTRIES entries of DIRECTORY; none if it cannot be read."""
    try:
        with os.scandir(directory) as entries:
            for looked, entry in enumerate(entries):
                if looked == MAX_ENTRIES:
                    log.warning("leftovers: looked at the first %d entries of %s only",
                                MAX_ENTRIES, _shown(directory))
                    return
                yield entry
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("leftovers: cannot list %s: %s", _shown(directory), exc.strerror)


class Leftover:
    """A process of a dead exporter, held so that only it is ever signalled:
    by its pidfd, or by pid after checking its start time again."""

    def __init__(self, pid: int, proc_root: str = "/proc"):
        self.pid = pid
        self.proc_dir = os.path.join(proc_root, str(pid))
        self.start = _start_time(self.proc_dir)
        self.fd: Optional[int] = None
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.start = None  # already gone
        except (AttributeError, OSError):
            pass  # no pidfds (Python < 3.9, Linux < 5.3): start-time checks only

    def alive(self) -> bool:
        if self.fd is not None:
            # A pidfd becomes readable when its process exits.
            return not select.select([self.fd], [], [], 0)[0]
        return self.start is not None and _start_time(self.proc_dir) == self.start \
            and _alive(self.pid)

    def send(self, sig: int) -> None:
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            elif self.alive():
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _dead_workdir(proc_dir: str, workdir_root: str, refusals: _Refusals) -> Optional[str]:
    """The dead exporter's private working directory that the process at
    PROC_DIR works in, or None (also when the process is another user's or
    gone)."""
    try:
        if os.stat(proc_dir).st_uid not in trust.trusted_uids():
            return None
        cwd = os.readlink(os.path.join(proc_dir, "cwd"))
        m = _WORKDIR_RE.match(os.path.basename(cwd))
        owner = owner_pid(m.group(1)) if m else None
        if os.path.dirname(cwd) != workdir_root or owner in (None, os.getpid()) \
                or _alive(owner):
            return None
        st = os.stat(os.path.join(proc_dir, "cwd"))  # the directory itself, wherever it is now
    except OSError:
        return None
    if trust.owner_problem(st) or st.st_mode & _PRIVATE_BITS or not stat.S_ISDIR(st.st_mode):
        refusals.note("leaving %s alone: not a private directory of ours (%s, mode %04o)",
                      cwd, trust.describe_owner(st.st_uid), stat.S_IMODE(st.st_mode))
        return None
    return cwd


def orphaned_processes(workdir_root: str, refusals: _Refusals,
                       proc_root: str = "/proc") -> List[Leftover]:
    """Processes a dead exporter started, each held by a pidfd and checked
    again once held (its pid may have been reused in between)."""
    found = []
    for entry in _entries(proc_root):
        pid = owner_pid(entry.name)
        if pid is None or pid == os.getpid() \
                or _dead_workdir(entry.path, workdir_root, refusals) is None:
            continue
        held = Leftover(pid, proc_root)
        if held.start is not None and _dead_workdir(entry.path, workdir_root, refusals):
            found.append(held)
        else:
            held.close()
    return found


def stop_processes(procs: List[Leftover], grace: float = SWEEP_GRACE) -> None:
    """SIGTERM, then SIGKILL after GRACE to those still alive -- only ever to
    the processes held, never to a pid that was reused."""
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                if p.alive():
                    p.send(sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p.alive() for p in procs):
                gevent.sleep(_POLL_INTERVAL)
                _reap()
            if not any(p.alive() for p in procs):
                return
    finally:
        _reap()
        for p in procs:
            p.close()


def _reap() -> None:
    # We are a child subreaper: orphans we killed may be our zombies now.
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def sweep_leftovers(procfs_dirs: Iterable[str], workdir_root: Optional[str] = None,
                    spare: Iterable[str] = ()) -> int:
    """Remove what dead exporters left; returns how many things were cleaned.
    The directories in SPARE (the persistent cache of compiled modules) are
    never removed, whatever their names.  Never raises: a start-up must not
    fail because of what others left."""
    root = os.path.realpath(workdir_root or tempfile.gettempdir())
    spared = {os.path.realpath(path) for path in spare}
    refusals = _Refusals()
    cleaned = 0
    try:
        procs = orphaned_processes(root, refusals)
        if procs:
            log.warning("leftovers: stopping %d processes of a dead exporter: %s", len(procs),
                        ", ".join(str(p.pid) for p in procs))
            stop_processes(procs)
            cleaned += len(procs)
        for directory in procfs_dirs:
            if not kernel_owned(directory):
                cleaned += _sweep_dir(directory, MODULE_RE, spared, refusals)
        cleaned += _sweep_dir(root, _WORKDIR_RE, spared, refusals)
    except Exception:  # noqa: BLE001 -- loop boundary: log and go on
        log.exception("leftovers: the sweep failed")
    refusals.summary()
    return cleaned


def _sweep_dir(directory: str, pattern: "re.Pattern[str]", spared: Iterable[str],
               refusals: _Refusals) -> int:
    """Remove the entries of DIRECTORY that PATTERN names after a dead
    exporter, that root (or our user) owns and that are not in SPARED."""
    cleaned = 0
    for entry in _entries(directory):
        m = pattern.match(entry.name)
        owner = owner_pid(m.group(1)) if m else None
        if owner is None or owner == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            problem = trust.owner_problem(st) or (
                not stat.S_ISDIR(st.st_mode) and "is %s, not a directory"
                % trust.type_name(st.st_mode))
            if problem:
                refusals.note("leaving %s alone: %s", entry.path, problem)
            elif not _alive(owner) and os.path.realpath(entry.path) not in spared:
                in_pool(trust.remove_tree, entry.path)
                log.info("leftovers: removed %s", _shown(entry.path))
                cleaned += 1
        except FileNotFoundError:
            pass
        except trust.Untrusted as exc:
            refusals.note("leaving %s alone: %s", exc.path, exc.reason)
        except OSError as exc:
            refusals.note("cannot remove %s: %s", entry.path, exc.strerror)
    return cleaned
