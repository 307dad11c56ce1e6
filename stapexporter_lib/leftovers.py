"""Clean-up after an exporter that died without stopping its scripts.

Module names carry the owning exporter's pid (``stapexp_<pid>_...``) and
working directories are ``stap-exporter.<pid>.*``.  At start-up, anything of
that naming whose owner is no longer alive is ours to clean: processes still
running such a module (a script that ignored the death signal), the BPF
runtime's module directories, and private working directories.  Leftovers of
a live exporter are never touched.

Runs once, before the server accepts connections.

Owns the start-up sweep.  Must not touch anything of a live exporter (its
own included) or run once the server serves; the names come from
``naming.py``.
"""

import logging
import os
import shutil
import signal
import tempfile
import time
from typing import Iterable, List, Optional

from .naming import MODULE_RE, WORKDIR_RE as _WORKDIR_RE, kernel_owned

log = logging.getLogger("stap-exporter")


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


def _dead_owner(owner: int) -> bool:
    return owner != os.getpid() and not _alive(owner)


def orphaned_processes(proc_root: str = "/proc") -> List[int]:
    """Pids of processes a dead exporter started: those whose working
    directory is one of its private working directories (stap, stapbpf and
    what a wrapper runs all inherit it) or that were given one of its module
    names with ``-m``.  An administrator's ``tail`` of a path that merely
    mentions such a name is not one of them."""
    found = []
    for entry in os.listdir(proc_root):
        if not entry.isdigit():
            continue
        if _started_by_dead_exporter(os.path.join(proc_root, entry)):
            found.append(int(entry))
    return found


def _started_by_dead_exporter(proc_dir: str) -> bool:
    try:
        cwd = os.readlink(os.path.join(proc_dir, "cwd"))
    except OSError:
        cwd = ""
    m = _WORKDIR_RE.match(os.path.basename(cwd.rstrip("/")))
    if m and _dead_owner(int(m.group(1))):
        return True
    try:
        with open(os.path.join(proc_dir, "cmdline"), "rb") as f:
            args = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    for flag, value in zip(args, args[1:]):
        if flag == "-m":
            m = MODULE_RE.match(value)
            if m and _dead_owner(int(m.group(1))):
                return True
    return False


def _kill(pids: List[int], grace: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
            _reap()
        if not any(_alive(p) for p in pids):
            return


def _reap() -> None:
    # We are a child subreaper: orphans we killed may be our zombies now.
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def sweep_leftovers(procfs_dirs: Iterable[str], workdir_root: Optional[str] = None) -> int:
    """Remove what dead exporters left; returns how many things were cleaned."""
    cleaned = 0
    pids = orphaned_processes()
    if pids:
        log.warning("leftovers: stopping %d processes of a dead exporter: %s", len(pids),
                    ", ".join(map(str, pids)))
        _kill(pids)
        cleaned += len(pids)
    for directory in procfs_dirs:
        if kernel_owned(directory):
            continue  # the kernel owns these
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for name in entries:
            m = MODULE_RE.match(name)
            if m and _dead_owner(int(m.group(1))):
                cleaned += _remove(os.path.join(directory, name))
    root = workdir_root or tempfile.gettempdir()
    try:
        entries = os.listdir(root)
    except OSError:
        entries = []
    for name in entries:
        m = _WORKDIR_RE.match(name)
        if m and _dead_owner(int(m.group(1))):
            cleaned += _remove(os.path.join(root, name))
    return cleaned


def _remove(path: str) -> int:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("leftovers: cannot remove %s: %s", path, exc.strerror)
        return 0
    log.info("leftovers: removed %s", path)
    return 1
