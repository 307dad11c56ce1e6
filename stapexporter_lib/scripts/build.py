"""How a plain script becomes a running module: the compile and loader
command lines, and the compiled modules kept for the next start.

A plain script is compiled with ``STAP [options] -p4 -m MODULE FILE`` and
its module then runs under the runtime's loader alone (``stapbpf
MODULE.bo``, ``staprun MODULE.ko``): a running script costs the host one
small process instead of an idle stap driver beside the loader.  ``Plan``
sorts the --stap options into those only the translator needs, those the
loader needs too or instead, and the rest; a script whose options no loader
can honour runs through the stap driver (the reason is logged once).

``stap -m MODULE`` turns off systemtap's own compile cache, so every start
would pay for a full compile (about a second for the BPF runtime, tens of
seconds for the kernel-module runtime).  ``ModuleCache`` keeps each compiled
module, keyed by a digest of the exact bytes that were compiled, the stap
version, the kernel release and the --stap command; the next start with the
same four loads it at once.  The cache directory (--cache-dir) is used only
if it and every directory above it are trusted (``trust.open_trusted_dir``);
otherwise a private directory of this process is used.  Entries are reached
through the directory's descriptor only, written under a temporary name and
renamed into place, read only when they are regular files of a trusted owner
that others cannot write, and bounded (MAX_ENTRIES, MAX_BYTES, least recently
used first).  A kernel module embeds its name, which carries the exporter's
pid: its key includes that name, and this process removes it at exit.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from typing import Dict, List, Optional, Set

from gevent import subprocess

from .. import trust
from . import naming
from ..logs import escape_line
from ..offhub import in_pool

log = logging.getLogger("stap-exporter")

# Compiled module suffix -> the runtime's loader.
LOADERS = {".bo": "stapbpf", ".ko": "staprun"}

# Translator-only options (the module they produce is all the loader needs).
_COMPILE_VALUE = {"-r", "-I", "-R", "-B", "-a", "-D", "-d", "--runtime", "--privilege",
                  "--sysroot", "--sysenv", "--modinfo"}
_COMPILE_FLAGS = {"-g", "-u", "-t", "-P", "-k", "--suppress-handler-errors",
                  "--disable-cache", "--ldd", "--all-modules", "--unprivileged",
                  "--suppress-time-limits"}
# Options both the translator and every loader take, as they are.
_BOTH_FLAGS = {"-v", "-w"}
# Run-time options every loader takes, as they are.
_LOADER_VALUE = {"-o", "-x", "-c"}
# Run-time options only some loaders take: suffix -> loader option (None:
# appended after the module as a module option).
_SOME_LOADERS = {"-s": {".ko": "-b"}, "-G": {".ko": None}}
_TAKES_VALUE = _COMPILE_VALUE | _LOADER_VALUE | set(_SOME_LOADERS)


class Plan:
    """How scripts run under one --stap command: its options sorted for the
    translator and the loaders."""

    def __init__(self, stap: List[str]):
        self.stap0 = stap[0]
        self.compile_args: List[str] = []
        self.loader_args: List[str] = []
        self._specific: List[tuple] = []     # (option, value)
        self.driver_reason: Optional[str] = None  # why every script needs the driver
        self._loaders: Dict[str, Optional[str]] = {}
        self._logged: Set[str] = set()
        self._sort(stap[1:])

    def _sort(self, words: List[str]) -> None:
        i = 0
        while i < len(words):
            word = words[i]
            name, value = _split(word)
            given = [word]  # as written: --runtime=bpf stays one word
            if name in _TAKES_VALUE and value is None:
                if i + 1 >= len(words):
                    self.driver_reason = "option %s in --stap has no value" % name
                    return
                i += 1
                value = words[i]
                given.append(value)
            i += 1
            if not self._take(name, value, given):
                self.driver_reason = ("option %s in --stap has no equivalent for the loaders"
                                      % escape_line(word))
                return

    def _take(self, name: str, value: Optional[str], given: List[str]) -> bool:
        """Sort one option (GIVEN, as written); False when no loader could
        honour it."""
        if name in _COMPILE_VALUE or name in _COMPILE_FLAGS:
            self.compile_args += given
        elif name in _BOTH_FLAGS or _repeated_flag(name):
            self.compile_args += given
            self.loader_args += given
        elif name in _LOADER_VALUE:
            self.loader_args += given
        elif name in _SOME_LOADERS:
            self._specific.append((name, value))
        else:
            return False
        return True

    def compile_argv(self, module: str, script_path: str) -> List[str]:
        return [self.stap0] + self.compile_args + ["-p4", "-m", module, script_path]

    def loader_refusal(self, suffix: str) -> Optional[str]:
        """None if the loader for modules ending in SUFFIX can run them with
        these options, else why not."""
        if self.driver_reason:
            return self.driver_reason
        if suffix not in LOADERS:
            return "the compile produced a %s module, which has no loader" % suffix
        for name, _value in self._specific:
            if suffix not in _SOME_LOADERS[name]:
                return "option %s in --stap has no equivalent for %s" % (name, LOADERS[suffix])
        if self._loader(suffix) is None:
            return "%s is not on PATH" % LOADERS[suffix]
        return None

    def loader_argv(self, suffix: str, module_file: str) -> List[str]:
        """The loader's command line for MODULE_FILE (check loader_refusal
        first)."""
        options, after = list(self.loader_args), []
        for name, value in self._specific:
            loader_option = _SOME_LOADERS[name][suffix]
            if loader_option is None:
                after.append(value)
            else:
                options += [loader_option, value]
        return [self._loader(suffix)] + options + [module_file] + after

    def note_driver(self, reason: str) -> None:
        """Log, once per reason, that scripts fall back to the stap driver."""
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("driver: %s; plain scripts run through the stap driver", reason)

    def _loader(self, suffix: str) -> Optional[str]:
        if suffix not in self._loaders:
            self._loaders[suffix] = shutil.which(LOADERS[suffix])
        return self._loaders[suffix]


def _split(word: str) -> tuple:
    """(option name, attached value or None): --runtime=bpf, -rKB, -v."""
    if word.startswith("--"):
        name, eq, value = word.partition("=")
        return name, (value if eq else None)
    if word.startswith("-") and len(word) > 2 and word[:2] in _TAKES_VALUE:
        return word[:2], word[2:]
    return word, None


def _repeated_flag(name: str) -> bool:
    """-vv, -vvv: more verbosity, which both stap and the loaders take."""
    return len(name) > 2 and name.startswith("-v") and set(name[1:]) == {"v"}


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
            # Once, before the server starts: a few metadata calls on the hub.
            self._fd = _open_cache_dir(self.directory)
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
        """The entry name of a module compiled from the bytes of SCRIPT_DIGEST
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
        """Copy the module file SOURCE in WORKDIR into the cache as NAME,
        atomically (in the thread pool); True if it was kept."""
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
            src = os.open(source, _READ_FLAGS, dir_fd=src_dir)
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
            in_pool(self.drop_now, name)

    def drop_now(self, name: str) -> None:
        """``drop`` in the calling thread (already away from the hub)."""
        _unlink(self._fd, name)

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
