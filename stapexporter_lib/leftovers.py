"""Clean-up after an exporter that died without stopping its scripts.

Module names carry the owning exporter's pid (``stapexp_<pid>_...``) and
working directories are ``stap-exporter.<pid>.*``.  At start-up, what a dead
exporter left is ours to clean: processes still running one of its modules
(a script that ignored the death signal), the BPF runtime's module
directories, and private working directories.  Leftovers of a live exporter
are never touched.

A name alone proves nothing: any local user can name a directory or a
process like ours.  So a process counts only if it runs as root (or our
user) and either names a dead exporter's module after ``-m`` or works in a
dead exporter's private working directory -- a root-owned mode-0700
directory directly in the temporary directory, which only root can make.  A
directory is removed only if root (or our user) owns it, through directory
descriptors without following links (trust.remove_tree).  Processes are
signalled through pidfds, so a pid that was reused after its process exited
is never signalled; without pidfds, the process's start time is checked
again right before each signal.  Whatever the sweep finds (huge numbers,
odd names, deep trees, entries that vanish), it logs and moves on.

Runs once, before the server accepts connections.

Owns the start-up sweep.  Must not touch anything of a live exporter (its
own included), anything another user owns, or run once the server serves;
the names come from ``naming.py``.
"""

import logging
import os
import re
import select
import signal
import stat
import tempfile
import time
from typing import Iterable, List, Optional

import gevent

from . import trust
from .offhub import in_pool
from .scripts.naming import MODULE_RE, WORKDIR_RE as _WORKDIR_RE, kernel_owned, owner_pid

log = logging.getLogger("stap-exporter")

# How long stopped processes get after SIGTERM, and then after SIGKILL.
SWEEP_GRACE = 2.0
_POLL_INTERVAL = 0.05
# A private working directory is made by mkdtemp: no access for others.
_PRIVATE_BITS = 0o077


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


def _dead_owner(text: str) -> bool:
    owner = owner_pid(text)
    return owner is not None and owner != os.getpid() and not _alive(owner)


def _start_time(proc_dir: str) -> Optional[str]:
    """Field 22 of /proc/PID/stat: with the pid, it identifies a process."""
    try:
        with open(os.path.join(proc_dir, "stat")) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


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


def why_ours(proc_dir: str, workdir_root: str) -> Optional[str]:
    """Why the process at PROC_DIR is a dead exporter's, or None if it is
    not (or is gone).  Never raises."""
    try:
        return _why_ours(proc_dir, workdir_root)
    except (OSError, ValueError, IndexError):
        return None


def _process_uids(proc_dir: str) -> List[int]:
    with open(os.path.join(proc_dir, "status")) as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def _why_ours(proc_dir: str, workdir_root: str) -> Optional[str]:
    with open(os.path.join(proc_dir, "cmdline"), "rb") as f:
        args = f.read().decode("utf-8", "replace").split("\0")
    module = None
    for flag, value in zip(args, args[1:]):
        m = MODULE_RE.match(value) if flag == "-m" else None
        if m and _dead_owner(m.group(1)):
            module = value
    workdir = _dead_workdir(proc_dir, workdir_root)
    if module is None and workdir is None:
        return None
    uids = _process_uids(proc_dir)
    if not uids or not set(uids[:2]) <= set(trust.trusted_uids()):
        log.warning("leftovers: leaving pid %s alone: it runs as %s, though it looks like"
                    " a dead exporter's (%s)", os.path.basename(proc_dir),
                    trust.describe_owner(uids[0] if uids else -1),
                    "module %s" % module if module else "working directory %s" % workdir)
        return None
    return "module %s" % module if module else "working directory %s" % workdir


def _dead_workdir(proc_dir: str, workdir_root: str) -> Optional[str]:
    """The process's working directory if it is a dead exporter's private
    one: named so, directly in WORKDIR_ROOT, owned by root (or us), private."""
    try:
        cwd = os.readlink(os.path.join(proc_dir, "cwd"))
    except OSError:
        return None
    m = _WORKDIR_RE.match(os.path.basename(cwd))
    if not m or os.path.dirname(cwd) != workdir_root or not _dead_owner(m.group(1)):
        return None
    st = os.stat(os.path.join(proc_dir, "cwd"))  # the directory itself, wherever it is now
    if trust.owner_problem(st) or st.st_mode & _PRIVATE_BITS or not stat.S_ISDIR(st.st_mode):
        log.warning("leftovers: leaving %s alone: not a private directory of ours (%s, mode"
                    " %04o)", cwd, trust.describe_owner(st.st_uid), stat.S_IMODE(st.st_mode))
        return None
    return cwd


def orphaned_processes(workdir_root: str, proc_root: str = "/proc") -> List[Leftover]:
    """Processes a dead exporter started, each held by a pidfd and checked
    again once held (its pid may have been reused in between)."""
    found = []
    try:
        entries = os.listdir(proc_root)
    except OSError as exc:
        log.warning("leftovers: cannot list %s: %s", proc_root, exc.strerror)
        return found
    for entry in entries:
        pid = owner_pid(entry)
        if pid is None or pid == os.getpid():
            continue
        proc_dir = os.path.join(proc_root, entry)
        if why_ours(proc_dir, workdir_root) is None:
            continue
        held = Leftover(pid, proc_root)
        if held.start is not None and why_ours(proc_dir, workdir_root) is not None:
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
    cleaned = 0
    try:
        procs = orphaned_processes(root)
        if procs:
            log.warning("leftovers: stopping %d processes of a dead exporter: %s", len(procs),
                        ", ".join(str(p.pid) for p in procs))
            stop_processes(procs)
            cleaned += len(procs)
    except Exception:  # noqa: BLE001 -- loop boundary: log and go on
        log.exception("leftovers: the process sweep failed")
    for directory in procfs_dirs:
        if not kernel_owned(directory):
            cleaned += _sweep_dir(directory, MODULE_RE, spared)
    return cleaned + _sweep_dir(root, _WORKDIR_RE, spared)


def _sweep_dir(directory: str, pattern: "re.Pattern", spared=frozenset()) -> int:
    """Remove the entries of DIRECTORY whose name PATTERN gives a dead
    owner's pid (not those in SPARED)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return 0
    cleaned = 0
    for name in entries:
        m = pattern.match(name)
        path = os.path.join(directory, name)
        if m and _dead_owner(m.group(1)) and os.path.realpath(path) not in spared:
            cleaned += _remove(path)
    return cleaned


def _remove(path: str) -> int:
    """trust.remove_tree in the thread pool; 1 if PATH was removed."""
    shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    try:
        in_pool(trust.remove_tree, path)
    except FileNotFoundError:
        return 0
    except trust.Untrusted as exc:
        log.warning("leftovers: leaving %s alone: %s", shown, exc.reason)
        return 0
    except OSError as exc:
        log.warning("leftovers: cannot remove %s: %s", shown, exc.strerror)
        return 0
    except Exception:  # noqa: BLE001 -- loop boundary: log and go on
        log.exception("leftovers: cannot remove %s", shown)
        return 0
    log.info("leftovers: removed %s", shown)
    return 1
