"""Compiled modules kept for the next start, across exporter restarts.

``stap -m MODULE`` turns off systemtap's own compile cache, so every start
would pay for a full translation and compile: about a second for the BPF
runtime and tens of seconds for the kernel-module runtime.  After a
successful compile (``stap -p4``), the module is copied into this cache,
keyed by a digest of the script's content, the stap version (``STAP -V``),
the kernel release and the --stap command; the next start with the same four
runs it with the loader alone.

The cache directory (``--cache-dir``, default /var/cache/stap-exporter) is
used only if root or the exporter's user owns it and every directory above
it, and group and others cannot write it (``trust.open_trusted_dir``); it is
created (mode 0700) when missing.  Otherwise the refusal is logged once and
a private directory of this process is used instead (in the temporary
directory, removed at exit: modules are reused only by this process).
Everything in it is reached through the directory's descriptor, never by
following a link: entries are written to a temporary name and renamed into
place, read only if they are regular files owned by a trusted user and not
writable by others, and copied into the loading run's working directory
under the run's own module name (no fsync: an entry a crash left damaged
fails to load, and is then removed and compiled afresh).  The cache holds at most MAX_ENTRIES
modules and MAX_BYTES bytes; the least recently used go first.

BPF modules take their name from their file name (``stapbpf X.bo`` runs as
module X), so one entry serves every later exporter.  A kernel module
(``.ko``) embeds its name, which carries the exporter's pid: its key
includes the module name, so it is reused by this exporter only, and it is
removed at exit.

Owns the cache directory and its entries.  Must not decide when a module
is compiled, kept or run (``launch.py``) or start anything but ``STAP -V``.
"""

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from typing import List, Optional, Set

from gevent import subprocess

from . import naming, trust
from .offhub import in_pool
from .logs import escape_line

log = logging.getLogger("stap-exporter")

# Bounds of the cache: entries and bytes; the least recently used go first.
MAX_ENTRIES = 256
MAX_BYTES = 256 * 1024 * 1024
# A temporary file left by a writer that died is removed after this long.
STALE_TEMP_SECONDS = 3600.0
# How long ``STAP -V`` may take.
VERSION_TIMEOUT = 20.0
# Copies go in chunks of this size.
COPY_CHUNK = 1024 * 1024

# What may be in the cache directory: entries and temporary files.
ENTRY_RE = re.compile(r"^[0-9a-f]{64}\.(bo|ko)$")
TEMP_PREFIX = ".tmp."

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class ModuleCache:
    """The cache directory, held open; reuse is off when DIRECTORY is None
    (--recompile)."""

    def __init__(self, directory: Optional[str], stap: List[str]):
        self.directory = directory
        self.stap = stap
        self.persistent = False
        self._fd: Optional[int] = None
        self._private: Optional[str] = None   # the per-process fallback directory
        self._identity = ""                   # stap version, kernel, --stap
        self._mine: Set[str] = set()          # .ko entries written by this process

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def setup(self) -> None:
        """Open (or make) the cache directory and learn the stap version.
        Runs once, before the first start; never raises."""
        if self.directory is None:
            return
        version = stap_version(self.stap)
        self._identity = json.dumps([version or "unknown:%d" % os.getpid(),
                                     os.uname().release, self.stap])
        try:
            self._fd = in_pool(_open_cache_dir, self.directory)
            self.persistent = True
            log.info("cache: dir=%s compiled modules are kept across restarts",
                     escape_line(self.directory))
        except (OSError, trust.Untrusted) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("cache: dir=%s refused: %s; compiled modules are kept for this"
                        " process only", escape_line(self.directory), escape_line(str(reason)))
            self._open_private()

    def _open_private(self) -> None:
        try:
            self._private = tempfile.mkdtemp(prefix=naming.cache_prefix(os.getpid()))
            self._fd = os.open(self._private, _DIR_FLAGS | os.O_NOFOLLOW)
        except OSError as exc:
            log.warning("cache: cannot make a private cache: %s; no module is reused",
                        exc.strerror)

    def key(self, script_digest: str, suffix: str, module: str) -> str:
        """The entry name of a module compiled from a script of SCRIPT_DIGEST
        (a .ko entry is MODULE's alone: the name is inside it)."""
        material = [self._identity, script_digest] + ([module] if suffix == ".ko" else [])
        return digest("\0".join(material).encode("utf-8", "surrogateescape")) + suffix

    def find(self, names: List[str]) -> Optional[str]:
        """The first of NAMES that is a usable entry (marked as used now).
        Blocking file calls: call it in the thread pool."""
        if not self.enabled:
            return None
        for name in names:
            try:
                st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and not _entry_problem(st):
                try:
                    os.utime(name, dir_fd=self._fd, follow_symlinks=False)
                except OSError:
                    pass
                return name
        return None

    def place(self, name: str, workdir: str, target: str) -> None:
        """Copy entry NAME to WORKDIR/TARGET (in the thread pool).  Raises
        OSError or trust.Untrusted when it cannot."""
        src = os.open(name, _READ_FLAGS, dir_fd=self._fd)
        try:
            problem = _entry_problem(os.fstat(src))
            if problem:
                raise trust.Untrusted(os.path.join(self.where(), name), problem)
            dst_dir = os.open(workdir, _DIR_FLAGS | os.O_NOFOLLOW)
            try:
                _copy(src, dst_dir, target)
            finally:
                trust.close_now(dst_dir)
        finally:
            trust.close_now(src)

    def store(self, workdir: str, source: str, name: str) -> bool:
        """Copy WORKDIR/SOURCE (a path relative to WORKDIR, no link followed)
        into the cache as NAME, atomically; True if it was kept."""
        if not self.enabled:
            return False
        try:
            in_pool(self._store, workdir, source, name)
        except (OSError, trust.Untrusted) as exc:
            log.warning("cache: cannot keep %s: %s", escape_line(source), escape_line(str(exc)))
            return False
        if name.endswith(".ko"):
            self._mine.add(name)
        return True

    def _store(self, workdir: str, source: str, name: str) -> None:
        src_dir = os.open(workdir, _DIR_FLAGS | os.O_NOFOLLOW)
        try:
            *dirs, leaf = source.split("/")  # each directory opened without following a link
            for part in dirs:
                inner = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=src_dir)
                trust.close_now(src_dir)
                src_dir = inner
            src = os.open(leaf, _READ_FLAGS, dir_fd=src_dir)
        finally:
            trust.close_now(src_dir)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
                raise trust.Untrusted(source, "is not a regular file of at most %d bytes"
                                      % MAX_BYTES)
            temp = "%s%d.%s" % (TEMP_PREFIX, os.getpid(), name)
            try:
                _copy(src, self._fd, temp)
                os.rename(temp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            except BaseException:
                _unlink(self._fd, temp)
                raise
        finally:
            trust.close_now(src)
        self._evict()

    def _evict(self) -> None:
        """Keep the bounds: drop the least recently used entries, and
        temporary files of writers that died."""
        entries = []
        now = time.time()
        with os.scandir(self._fd) as listing:
            for entry in listing:
                st = entry.stat(follow_symlinks=False)
                if ENTRY_RE.match(entry.name) and stat.S_ISREG(st.st_mode):
                    entries.append((st.st_mtime, st.st_size, entry.name))
                elif (entry.name.startswith(TEMP_PREFIX)
                      and now - st.st_mtime > STALE_TEMP_SECONDS):
                    _unlink(self._fd, entry.name)
        entries.sort(reverse=True)
        total = 0
        for count, (_mtime, size, name) in enumerate(entries, 1):
            total += size
            if count > MAX_ENTRIES or total > MAX_BYTES:
                _unlink(self._fd, name)
                log.info("cache: evicted %s (bounds: %d modules, %d bytes)", name,
                         MAX_ENTRIES, MAX_BYTES)

    def drop(self, name: str) -> None:
        if self.enabled:
            in_pool(_unlink, self._fd, name)

    def where(self) -> str:
        return self._private or self.directory or ""

    def clear(self) -> None:
        """At exit: remove the private cache, or this process's kernel
        modules from the persistent one (nobody else can load them)."""
        if self._fd is None:
            return
        for name in self._mine:
            _unlink(self._fd, name)
        trust.close_now(self._fd)
        self._fd = None
        if self._private is not None:
            try:
                trust.remove_tree(self._private)
            except (OSError, trust.Untrusted) as exc:
                log.warning("cache: cannot remove %s: %s", self._private, exc)
            self._private = None


def stap_version(stap: List[str]) -> Optional[str]:
    """The output of ``STAP -V`` (it names the translator's version), or
    None when it cannot be had."""
    try:
        proc = subprocess.Popen(stap[:1] + ["-V"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        log.warning("cache: cannot run %s -V: %s", escape_line(stap[0]), exc.strerror)
        return None
    try:
        out, _ = proc.communicate(timeout=VERSION_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        log.warning("cache: %s -V took over %g s", escape_line(stap[0]), VERSION_TIMEOUT)
        return None
    if proc.returncode != 0:
        return None
    return out.decode("utf-8", "replace")


def _open_cache_dir(path: str) -> int:
    """A descriptor of the trusted cache directory PATH, made if missing."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, 0o700)
    held = trust.open_trusted_dir(path)
    try:
        return os.open(".", _DIR_FLAGS, dir_fd=held)
    finally:
        trust.close_now(held)


def _entry_problem(st: os.stat_result) -> Optional[str]:
    if not stat.S_ISREG(st.st_mode):
        return "is %s, not a regular file" % trust.type_name(st.st_mode)
    return trust.owner_problem(st) or trust.mode_problem(st)


def _copy(src: int, dir_fd: int, name: str) -> None:
    """Copy the open file SRC to a new file NAME in DIR_FD (mode 0600)."""
    dst = os.open(name, _WRITE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        os.lseek(src, 0, os.SEEK_SET)
        while True:
            chunk = os.read(src, COPY_CHUNK)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
    finally:
        trust.close_now(dst)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
