"""What a script costs the kernel, and the kernel's BPF run-time statistics.

A running BPF script's loader (stapbpf) holds a descriptor for each of its
programs and maps, and ``/proc/PID/fdinfo/FD`` describes each: a program
has ``prog_type``, ``run_time_ns``, ``run_cnt`` and ``memlock`` lines, a map
``map_type``, ``max_entries`` and ``memlock``.  The run figures grow only
while the kernel's statistics are on, which costs two clock reads per program
run; ``enable_stats`` turns them on for the exporter's life (--bpf-stats).
A kernel-module script's module gives its size in
``/sys/module/MODULE/coresize``.

The proc and sysfs roots are parameters, so tests point them at fixture
trees.  The readers do plain blocking file reads: callers in greenlets run
them in the hub's thread pool (``proccost.measure`` does).
"""

import ctypes
import logging
import os
from typing import Callable, Dict, Iterable, NamedTuple, Optional, Tuple

log = logging.getLogger("stap-exporter")

DEFAULT_PROC = "/proc"
DEFAULT_SYS = "/sys"
SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"

# What readlink(/proc/PID/fd/FD) says of a BPF program's or map's descriptor.
PROG_LINK = "anon_inode:bpf-prog"
MAP_LINK = "anon_inode:bpf-map"

# An fdinfo text is a dozen short lines; a module's coresize one number.
_FDINFO_MAX = 4096
_SYSFS_MAX = 64

# bpf(2): the command that turns the run-time statistics on for as long as
# the descriptor it returns stays open, and the kind of statistics.
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

# The bpf() system call's number, by machine (uname -m).
SYS_BPF = {
    "x86_64": 321, "i386": 357, "i686": 357, "aarch64": 280, "riscv64": 280,
    "loongarch64": 280, "armv7l": 386, "ppc64le": 361, "ppc64": 361, "s390x": 351,
}


class KernelCost(NamedTuple):
    """One script's cost to the kernel."""

    memory_bytes: int     # BPF: its programs' and maps' memlock; kernel module: its size
    bpf: bool             # True for BPF programs, False for a kernel module
    probe_seconds: float  # run time of its BPF programs (grows only with the statistics on)
    probe_runs: int       # runs of its BPF programs (likewise)


def parse_fdinfo(text: str) -> Dict[str, str]:
    """The ``key: value`` lines of an fdinfo text, as a dict."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _number(fields: Dict[str, str], key: str) -> int:
    try:
        return int(fields.get(key, "0"))
    except ValueError:
        return 0


def _read(path: str, limit: int) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:  # gone since the listing, or not readable
        return None


def bpf_cost(pids: Iterable[int], proc: str = DEFAULT_PROC) -> Optional[KernelCost]:
    """The cost of the BPF programs and maps the processes PIDS hold, or None
    when they hold none.  A program or map held by several of them counts
    once.  Never raises for processes or descriptors that vanish."""
    held: Dict[Tuple[str, str], Dict[str, str]] = {}
    for pid in pids:
        fd_dir = os.path.join(proc, str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target not in (PROG_LINK, MAP_LINK):
                continue
            text = _read(os.path.join(proc, str(pid), "fdinfo", fd), _FDINFO_MAX)
            if text is None:
                continue
            kind = "prog" if target == PROG_LINK else "map"
            fields = parse_fdinfo(text)
            held[kind, fields.get(kind + "_id") or "%s/%s" % (pid, fd)] = fields
    if not held:
        return None
    programs = [fields for (kind, _), fields in held.items() if kind == "prog"]
    return KernelCost(memory_bytes=sum(_number(f, "memlock") for f in held.values()), bpf=True,
                      probe_seconds=sum(_number(f, "run_time_ns") for f in programs) / 1e9,
                      probe_runs=sum(_number(f, "run_cnt") for f in programs))


def module_cost(module: str, sys: str = DEFAULT_SYS) -> Optional[KernelCost]:
    """The size of the loaded kernel module MODULE, or None when it is not
    loaded (or its size is not shown)."""
    if not module or os.sep in module or module.startswith("."):
        return None
    text = _read(os.path.join(sys, "module", module, "coresize"), _SYSFS_MAX)
    try:
        size = int(text or "")
    except ValueError:
        return None
    return KernelCost(memory_bytes=size, bpf=False, probe_seconds=0.0, probe_runs=0)


def kernel_cost(pids: Iterable[int], module: Optional[str], proc: str = DEFAULT_PROC,
                sys: str = DEFAULT_SYS) -> Optional[KernelCost]:
    """What the script whose processes are PIDS and whose module is MODULE
    costs the kernel: its BPF programs and maps, else its kernel module;
    None when it has neither."""
    return bpf_cost(pids, proc) or (module_cost(module, sys) if module else None)


# -- the run-time statistics --------------------------------------------------

class StatsError(Exception):
    """The statistics could not be turned on; the message is one line."""


def bpf_enable_stats(machine: Optional[str] = None) -> int:
    """bpf(BPF_ENABLE_STATS, BPF_STATS_RUN_TIME): a descriptor that keeps the
    statistics on while it is open (close-on-exec).  Raises OSError when the
    kernel refuses, StatsError on a machine whose system call number is not
    known here."""
    machine = machine or os.uname().machine
    number = SYS_BPF.get(machine)
    if number is None:
        raise StatsError("--bpf-stats: the bpf() system call's number on %s is not known"
                         % machine)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.c_uint32(BPF_STATS_RUN_TIME)  # union bpf_attr's enable_stats.type
    fd = libc.syscall(ctypes.c_long(number), ctypes.c_long(BPF_ENABLE_STATS),
                      ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.set_inheritable(fd, False)
    return fd


def enable_stats(sysctl: str = SYSCTL,
                 enable: Callable[[], int] = bpf_enable_stats) -> Tuple[str, Callable[[], None]]:
    """Turn the kernel's BPF run-time statistics on: (how, the function that
    undoes it).  A held BPF_ENABLE_STATS descriptor first (closing it, or the
    exporter's end, turns them off: nothing is left changed on the host);
    only when the kernel refuses that, the SYSCTL, put back as it was by the
    undo.  Raises StatsError."""
    try:
        fd = enable()
    except OSError as exc:
        refused = "bpf(BPF_ENABLE_STATS): %s" % exc.strerror
    else:
        return "a BPF_ENABLE_STATS descriptor held", lambda: os.close(fd)
    try:
        with open(sysctl) as f:
            old = f.read().strip()
        if old != "1":
            _write(sysctl, "1")
    except OSError as exc:
        raise StatsError("--bpf-stats: cannot turn the kernel's BPF statistics on: %s; %s: %s"
                         % (refused, sysctl, exc.strerror)) from None

    def restore() -> None:
        if old == "1":
            return
        try:
            _write(sysctl, old)
        except OSError as exc:
            log.error("bpf-stats: cannot put %s back to %s: %s", sysctl, old, exc.strerror)
    return "%s set to 1 (%s; put back to %s at exit)" % (sysctl, refused, old), restore


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value + "\n")
