"""Signalling what is left of a script's process group after its leader died.

While the leader is our child and not yet reaped (running or a zombie), its
pid, and so its process group id, cannot be anyone else's: the group can be
signalled as a whole (``unreaped``).  Once the leader is reaped, the number
is freed with the group's last member, and anyone may then take it for a new
group of their own: a ``killpg`` by number could reach an unrelated process.
So the members are looked up in /proc and each one is signalled through a
pidfd, and only if /proc shows it, while the pidfd holds it, to be in the
group and to descend from the exporter (``signal_members``).  The exporter
is a child subreaper, so a script's orphans stay below it.

Owns the signals to a process group whose leader was reaped.  Must not
signal a process it has not proved its own, log, or know about scripts.
"""

import contextlib
import os
import signal
from typing import List, NamedTuple, Optional, Tuple

PROC = "/proc"
# Longest chain of parents walked from a member up to the exporter.
MAX_DEPTH = 256
# How often a walk starts over when a parent on the way exits meanwhile.
MAX_WALKS = 8


class Stat(NamedTuple):
    comm: str
    ppid: int
    pgrp: int


class Refused(NamedTuple):
    """A member of the group that was not signalled: its command name (if
    read) and why, a phrase that follows the name."""
    pid: int
    comm: str
    reason: str


class _Gone(Exception):
    """The process exited while it was looked at."""


class _Moved(Exception):
    """A process on the way up exited meanwhile (its children moved up)."""


def unreaped(pid: int) -> bool:
    """True while PID is our child and not yet reaped: its pid and process
    group id are then still its own.  Asks the kernel without reaping
    (WNOWAIT), so it holds even if gevent's child watcher has reaped the
    child and not yet said so."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def read_stat(pid: int, proc_root: str = PROC) -> Stat:
    """PID's command name, parent and process group from PROC_ROOT/PID/stat;
    raises _Gone if it has none.  The name may hold spaces and parentheses:
    the fields are read after the last ')'."""
    try:
        with open("%s/%d/stat" % (proc_root, pid), "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        raise _Gone(pid) from None
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    try:
        return Stat(head.partition("(")[2], int(fields[1]), int(fields[2]))
    except (IndexError, ValueError):
        raise _Gone(pid) from None


def group_members(pgid: int, proc_root: str = PROC) -> List[int]:
    """Pids whose process group is PGID, as /proc lists them: a snapshot, so
    any of them may since have exited or be another process."""
    members = []
    try:
        entries = os.listdir(proc_root)
    except OSError:  # no /proc: no member can be found, let alone proved ours
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            if read_stat(int(entry), proc_root).pgrp == pgid:
                members.append(int(entry))
        except _Gone:
            continue
    return members


def _hold(pid: int, held: contextlib.ExitStack) -> int:
    """A pidfd for PID, closed with HELD; raises _Gone if PID has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise _Gone(pid) from None
    held.callback(os.close, fd)
    return fd


def _exists(fd: int) -> bool:
    """The pidfd's process has not been reaped: it still holds its pid."""
    try:
        signal.pidfd_send_signal(fd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _descends(pid: int, ancestor: int, proc_root: str) -> bool:
    """Whether /proc shows PID (held by the caller) below ANCESTOR.  Each
    parent is held by a pidfd before it is read, and the child is read again
    once its parent is held: what was read is then the child's parent, not a
    process that took the parent's pid after it exited.  Raises _Moved if a
    parent exited on the way."""
    child, parent = pid, read_stat(pid, proc_root).ppid
    with contextlib.ExitStack() as parents:
        fds = []
        for _ in range(MAX_DEPTH):
            if parent == ancestor:
                if not all(_exists(fd) for fd in fds):
                    raise _Moved(pid)
                return True
            if parent <= 1:
                return False
            try:
                fds.append(_hold(parent, parents))
                if read_stat(child, proc_root).ppid != parent:
                    raise _Moved(pid)
                child, parent = parent, read_stat(parent, proc_root).ppid
            except _Gone:
                raise _Moved(pid) from None
    return False


def _signal_member(pid: int, pgid: int, sig: int, ancestor: int,
                   proc_root: str) -> Optional[Refused]:
    """Send SIG to PID if it is a member of PGID below ANCESTOR; returns None
    once signalled, else why not.  Raises _Gone if PID exited or left the
    group."""
    with contextlib.ExitStack() as held:
        fd = _hold(pid, held)
        stat = read_stat(pid, proc_root)
        if stat.pgrp != pgid:
            raise _Gone(pid)
        for _ in range(MAX_WALKS):
            try:
                ours = _descends(pid, ancestor, proc_root)
                break
            except _Moved:
                continue
        else:
            return Refused(pid, stat.comm, "kept changing parents while they were read")
        if not ours:
            return Refused(pid, stat.comm,
                           "is not a descendant of the exporter (pid %d)" % ancestor)
        try:
            # Through the pidfd: the process read above, or nobody.
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            raise _Gone(pid) from None
        return None


def signal_members(pgid: int, sig: int, proc_root: str = PROC,
                   ancestor: int = 0) -> Tuple[List[int], List[Refused]]:
    """Send SIG (0: none, only look) to each member of process group PGID that
    descends from ANCESTOR (default: this process).  Returns the pids
    signalled and the members refused; members that exit meanwhile are
    neither.  Without pidfds (Linux < 5.3) every member is refused: nothing
    else proves which process a pid is.

    A look that finds nobody is taken once more before the group counts as
    empty: /proc is listed before its entries are read, so one look can miss
    a process that a member forked just before it exited (the member is gone
    when read, its child came after the listing)."""
    ancestor = ancestor or os.getpid()
    for _ in range(2):
        signalled, refused = _look(pgid, sig, proc_root, ancestor)
        if signalled or refused:
            break
    return signalled, refused


def _look(pgid: int, sig: int, proc_root: str, ancestor: int) -> Tuple[List[int], List[Refused]]:
    """One pass of ``signal_members`` over the group's members as listed now."""
    signalled, refused = [], []
    for pid in group_members(pgid, proc_root):
        try:
            refusal = _signal_member(pid, pgid, sig, ancestor, proc_root)
        except _Gone:
            continue
        except (AttributeError, OSError) as exc:  # no pidfds here, no descriptors left
            refusal = Refused(pid, "", "cannot be held and signalled by a pidfd: %s"
                              % (getattr(exc, "strerror", None) or exc))
        if refusal:
            refused.append(refusal)
        else:
            signalled.append(pid)
    return signalled, refused
