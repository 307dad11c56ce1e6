"""What a script's processes cost the host, read from ``/proc``.

A script runs in its own process group (the session spawns it with
``start_new_session``), so its cost is the sum over every process whose
process group id is the script's pid: stap, its loader (stapbpf, staprun),
a wrapper's children.  ``group_costs`` reads ``PROC/PID/stat`` of every
process once per call and sums the figures per group; what the group costs
the kernel (``bpfstats``) is read in the same pass.

The proc and sysfs roots are parameters (as in prometheus_client's
``ProcessCollector``) so tests can point them at fixture trees.
``group_costs`` does plain blocking file reads; ``measure`` runs it in the
gevent hub's thread pool, for callers in greenlets.

Owns reading a process group's CPU time and memory from /proc, with its
kernel cost.  Must not know about sessions, HTTP or metrics, or signal
anything.
"""

import os
import time
from typing import Dict, Iterable, Mapping, NamedTuple, Optional

import gevent.event

from ..offhub import in_pool
from . import bpfstats

DEFAULT_PROC = "/proc"

# Fields of /proc/PID/stat counted from the one after the command name
# (field 3, the state, is index 0): see proc(5).
_PGRP = 5 - 3
_UTIME = 14 - 3
_STIME = 15 - 3
_CUTIME = 16 - 3
_CSTIME = 17 - 3
_RSS = 24 - 3

# A stat line is short (about 300 bytes); this is ample.
_STAT_MAX = 4096


def _sysconf(name: str, fallback: int) -> int:
    try:
        value = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return fallback
    return value if value > 0 else fallback


CLOCK_TICKS = _sysconf("SC_CLK_TCK", 100)
PAGE_SIZE = _sysconf("SC_PAGESIZE", 4096)


class Cost(NamedTuple):
    """One process group's cost."""

    cpu_seconds: float     # user+system, including children its members reaped
    resident_bytes: int    # sum of the members' resident set sizes
    processes: int         # how many processes were counted
    kernel: Optional[bpfstats.KernelCost] = None  # its BPF programs and maps, or module


def parse_stat(text: str) -> Optional[tuple]:
    """(pgrp, cpu seconds, resident bytes) from one ``/proc/PID/stat`` line,
    or None if it cannot be parsed.  The command name may hold spaces and
    parentheses: the fields are counted from its last ``)``."""
    _, paren, rest = text.rpartition(")")
    if not paren:
        return None
    fields = rest.split()
    try:
        ticks = (int(fields[_UTIME]) + int(fields[_STIME])
                 + int(fields[_CUTIME]) + int(fields[_CSTIME]))
        return int(fields[_PGRP]), ticks / CLOCK_TICKS, int(fields[_RSS]) * PAGE_SIZE
    except (IndexError, ValueError):
        return None


def _read_stat(proc: str, pid: str) -> Optional[str]:
    try:
        with open(os.path.join(proc, pid, "stat"), "rb") as f:
            return f.read(_STAT_MAX).decode("ascii", "replace")
    except OSError:  # gone since the listing, or not readable
        return None


def group_costs(pgids: Iterable[int], proc: str = DEFAULT_PROC,
                modules: Optional[Mapping[int, str]] = None, sys: str = bpfstats.DEFAULT_SYS
                ) -> Dict[int, Cost]:
    """The cost of each process group in PGIDS, from one pass over PROC
    (MODULES: the kernel module of a group's script, by pgid).  A group with
    no live process is absent from the result.  Never raises for processes
    that vanish or stat lines that do not parse."""
    wanted = set(pgids)
    totals: Dict[int, list] = {}
    if not wanted:
        return {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        text = _read_stat(proc, entry)
        parsed = parse_stat(text) if text is not None else None
        if parsed is None or parsed[0] not in wanted:
            continue
        total = totals.setdefault(parsed[0], [0.0, 0, []])
        total[0] += parsed[1]
        total[1] += parsed[2]
        total[2].append(entry)
    return {pgid: Cost(cpu, rss, len(pids),
                       bpfstats.kernel_cost(pids, (modules or {}).get(pgid), proc, sys))
            for pgid, (cpu, rss, pids) in totals.items()}


# How long one pass over /proc answers for: the index page and /metrics
# share it, so a client repeating GET / cannot make the exporter scan /proc
# more than once per MAX_AGE seconds.
MAX_AGE = 1.0

_last = {}  # (proc, sys, groups) -> (monotonic time, result or AsyncResult in flight)


def measure(modules: Mapping[int, str], proc: str = DEFAULT_PROC,
            sys: str = bpfstats.DEFAULT_SYS, clock=time.monotonic) -> Dict[int, Cost]:
    """``group_costs`` of the groups MODULES names (pgid -> the kernel module
    of its script) run in the gevent hub's thread pool, so that a greenlet
    answering a request never blocks the hub on hundreds of file reads; one
    pass at a time and at most one per MAX_AGE seconds for the same groups
    (callers meanwhile share its result)."""
    key = (proc, sys, frozenset(modules.items()))
    if not key[2]:
        return {}
    now = clock()
    entry = _last.get(key)
    if entry is not None and now - entry[0] < MAX_AGE:
        result = entry[1]
        return result.get() if isinstance(result, gevent.event.AsyncResult) else result
    flight = gevent.event.AsyncResult()
    _last.clear()  # only the newest set of groups is worth keeping
    _last[key] = (now, flight)
    try:
        result = in_pool(group_costs, list(modules), proc, dict(modules), sys)
    except BaseException as exc:
        _last.pop(key, None)
        flight.set_exception(exc)
        raise
    _last[key] = (now, result)
    flight.set(result)
    return result
