"""What a start of a script runs: the command line of each of its processes,
and the compiled module kept for the next start.

Before each start the script file is read (in the hub's thread pool): its
digest keys the compiled-module cache and its ``// prometheus: TYPE/HELP``
comments give the declarations.  An executable script runs directly with
``-m MODULE`` appended.  A plain one is compiled (``STAP -p4 -m MODULE
FILE``, a "compile" run) and its module then runs under the runtime's loader
alone (a "load" run in the same working directory), so that the running
script's process tree is the loader only.  For the BPF runtime the two are
one process: the compile runs under a shell that becomes the loader once
stap says the module is complete (``loaders.CHAIN_SCRIPT``), and the run
turns from "compile" into "load" when the exporter sees that
(``load_in_place``).  A module kept in the cache for
this script, stap, kernel and --stap is loaded at once, copied into the
run's working directory under the run's module name.  When the loader cannot
honour the --stap options (``loaders.py``), or without ``DirectLoad`` at
all, the script runs through the stap driver (``STAP -m MODULE FILE``).

Owns those choices for one script.  Must not spawn, signal or wait for
processes (``child.py``), or decide when to start (``session.py``).
"""

import dataclasses
import logging
import os
import stat
from typing import Callable, List, Optional, Tuple

import gevent

from . import compiled, dirwatch, loaders
from .catalog import Script
from .child import ChildRun, rmtree
from .declarations import Annotator, parse_declarations
from .logs import escape_line
from .offhub import in_pool

log = logging.getLogger("stap-exporter")

# The most of a script file read for its digest and declarations.
MAX_SCRIPT_BYTES = 4 * 1024 * 1024

# The kinds of run a start is made of.
WRAPPER = "wrapper"   # an executable script, as it is
DRIVER = "driver"     # STAP -m MODULE FILE
COMPILE = "compile"   # STAP -p4 -m MODULE FILE
LOAD = "load"         # the loader alone, on the compiled module


@dataclasses.dataclass
class DirectLoad:
    """Compile-then-load for plain scripts: how the --stap options split
    between translator and loader, and where compiled modules are kept."""

    plan: loaders.Plan
    cache: compiled.ModuleCache


@dataclasses.dataclass
class Step:
    """One process of a start."""

    kind: str
    argv: List[str]
    workdir: Optional[str] = None     # an existing working directory to run in
    prepare: Optional[Callable[[str], None]] = None  # fills a new one (thread pool)
    continues: bool = False           # the start is already under way
    chained: bool = False             # a compile that becomes the loader (loaders.CHAIN_SCRIPT)
    shown: Optional[List[str]] = None  # what the log says it runs, if not ARGV

    def discard(self) -> None:
        """The step will not run: remove the working directory it was given."""
        if self.workdir:
            rmtree(self.workdir)
            self.workdir = None

    def log_spawn(self, script: Script, pid: int) -> None:
        """One line per process: "compiling" for a compile, "spawned" for the
        process that runs the script."""
        argv = escape_line(" ".join(self.shown or self.argv))
        if self.kind == COMPILE:
            log.info("compiling: script=%s pid=%d module=%s argv=%s%s", script.name, pid,
                     script.module, argv, " (then the loader, in the same process)"
                     if self.chained else "")
        else:
            log.info("spawned: script=%s pid=%d module=%s run=%s argv=%s", script.name, pid,
                     script.module, self.kind, argv)


class Launch:
    """The command lines of one script's starts."""

    def __init__(self, script: Script, stap: List[str], direct: Optional[DirectLoad]):
        self.script = script
        self.stap = stap
        self.direct = direct
        self.digest: Optional[str] = None  # of the script file at the last start
        self.from_cache = False             # this run loads a kept module
        self._kept: Optional[str] = None    # the cache entry this run loads
        self._compiled: Optional[Tuple[str, str]] = None  # (workdir, suffix) to load
        self._annotator: Optional[Annotator] = None
        self._driver_reason: Optional[str] = None  # why this script now runs the driver way
        self._found: Optional[str] = None   # the cache entry read_script found for this start
        self._to_keep: Optional[Tuple[str, str, str]] = None  # (workdir, module, cache name)
        self._keeping: Optional[gevent.Greenlet] = None       # the copy into the cache

    def read_script(self) -> Optional[Annotator]:
        """Read the script file and look its module up in the cache (one
        trip to the thread pool); returns its declarations' annotator, None
        when it declares nothing or cannot be read.  Not read again for the
        loader after a compile: it runs what was read."""
        if self._compiled is not None:
            return self._annotator
        look_up = self._may_load_kept()

        def read():
            with open(self.script.path, "rb") as f:
                content = f.read(MAX_SCRIPT_BYTES)
            script_digest = compiled.digest(content)
            return content, script_digest, (self._find(script_digest) if look_up else None)
        try:
            content, self.digest, self._found = in_pool(read)
        except OSError as exc:
            log.warning("declarations: script=%s cannot read the script: %s", self.script.name,
                        exc.strerror)
            self.digest = self._annotator = self._found = None
            return None
        annotator = Annotator(parse_declarations(content.decode("utf-8", "replace")))
        self._annotator = annotator if annotator else None
        return self._annotator

    def next_step(self) -> Step:
        """The next process of the start under way."""
        module = self.script.module
        self.from_cache = False
        if self.script.is_executable():
            return Step(WRAPPER, [self.script.path, "-m", module])
        plan = self.direct.plan if self.direct else None
        if self._driver_reason is not None:
            return self._driver()
        if plan is None or plan.driver_reason:
            if plan is not None:
                plan.note_driver(plan.driver_reason)
            return self._driver()
        if self._compiled is not None:
            workdir, suffix = self._compiled
            self._compiled = None
            refusal = plan.loader_refusal(suffix)
            if refusal:
                plan.note_driver(refusal)
                return Step(DRIVER, self._driver().argv, workdir=workdir, continues=True)
            return Step(LOAD, plan.loader_argv(suffix, module + suffix), workdir=workdir,
                        continues=True)
        kept, self._found = self._found, None
        if kept is not None and not plan.loader_refusal(os.path.splitext(kept)[1]):
            suffix = os.path.splitext(kept)[1]
            self.from_cache, self._kept = True, kept
            cache = self.direct.cache
            return Step(LOAD, plan.loader_argv(suffix, module + suffix),
                        prepare=lambda workdir: cache.place(kept, workdir, module + suffix))
        argv = plan.compile_argv(module, self.script.path)
        chained = plan.chained_argv(module, argv)
        return Step(COMPILE, chained or argv, chained=bool(chained), shown=argv)

    def fall_back_to_driver(self, run: ChildRun) -> bool:
        """RUN, the loader alone on a module just compiled, exited before any
        output: the loader does not run here as stap would run it (an
        environment stap's wrapper sets up, say).  From now on this script
        runs through the stap driver; True if that is new (logged once)."""
        if self._driver_reason is not None:
            return False
        self._driver_reason = "the loader alone failed (%s)" % (
            "exit status %s" % run.returncode)
        log.warning("driver: script=%s pid=%d %s; running it through the stap driver from"
                    " now on", self.script.name, run.pid, self._driver_reason)
        return True

    def _driver(self) -> Step:
        return Step(DRIVER, list(self.stap) + ["-m", self.script.module, self.script.path])

    def _may_load_kept(self) -> bool:
        """The next step may load a kept module (``next_step``'s conditions)."""
        plan = self.direct.plan if self.direct else None
        return (plan is not None and not plan.driver_reason and self._driver_reason is None
                and not self.script.is_executable())

    def _find(self, script_digest: str) -> Optional[str]:
        """The kept module for SCRIPT_DIGEST (called in the thread pool)."""
        cache = self.direct.cache
        return cache.find([cache.key(script_digest, suffix, self.script.module)
                           for suffix in loaders.LOADERS])

    def compiled_pending(self) -> bool:
        """A compile of the start under way has left a module to load."""
        return self._compiled is not None

    def watch_compile(self, run: ChildRun) -> Optional[dirwatch.Watch]:
        """For a chained compile RUN just spawned: a watch on its working
        directory, to know the moment its shell becomes the loader
        (``compiled_early``)."""
        return dirwatch.shared().watch(run.workdir) if run.chained else None

    def compiled_early(self, run: ChildRun, watch: Optional[dirwatch.Watch]) -> bool:
        """True if RUN, a chained compile, has become the loader (or is about
        to): its shell wrote ``loaders.CHAIN_MARKER`` (WATCH saw it closed;
        without a watch, the file is looked for).  The exporter learns it
        after the fact: the shell does not wait for it."""
        if not run.chained or not run.workdir:
            return False
        if watch is not None and not watch.completed(loaders.CHAIN_MARKER):
            return False
        return _regular_file(os.path.join(run.workdir, loaders.CHAIN_MARKER))

    def load_in_place(self, run: ChildRun) -> None:
        """RUN, a chained compile (``loaders.CHAIN_SCRIPT``), has become the
        loader (``compiled_early``): keep the module it loads in the cache
        and log the load; the caller then turns the run into a load
        (``ChildRun.become``).  A loader that fails makes the script fall
        back to the driver, as after any loader that fails."""
        suffix = loaders.CHAINED_SUFFIX
        module_file = self.script.module + suffix
        source = self._chain_module(run.workdir, module_file)
        if source is not None:
            self._keep_in_cache(run.workdir, source, suffix)
        log.info("compiled: script=%s pid=%d module=%s", self.script.name, run.pid,
                 self.script.module)
        log.info("spawned: script=%s pid=%d module=%s run=%s argv=%s", self.script.name, run.pid,
                 self.script.module, LOAD, escape_line(" ".join(self.direct.plan.loader_argv(
                     suffix, source or module_file))))

    def _chain_module(self, workdir: str, module_file: str) -> Optional[str]:
        """The module a chain's marker names (relative to WORKDIR), or None
        if it names none that the chain could have written."""
        def read() -> bytes:
            fd = os.open(os.path.join(workdir, loaders.CHAIN_MARKER),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                return os.read(fd, 256)
            finally:
                os.close(fd)
        try:
            text = in_pool(read).decode("ascii", "replace")
        except OSError as exc:
            log.warning("cache: script=%s cannot read which module its compile loads: %s",
                        self.script.name, exc.strerror)
            return None
        return loaders.chain_marker_path(text, module_file)

    def take_compiled(self, run: ChildRun) -> bool:
        """True if RUN was a compile that left a module and exited with
        status 0 (a chained one whose compiler did not name a BPF module: a
        kernel module, say).  Its working directory is taken over for
        the loader's run (spawned next).  A compile that failed, or left
        nothing, ends the start like any failing run."""
        if run.kind != COMPILE or run.returncode != 0:
            return False
        if not self._compiled_in(run.workdir):
            run.stderr_tail.append("the compile left no module in its working directory")
            return False
        log.info("compiled: script=%s pid=%d module=%s", self.script.name, run.pid,
                 self.script.module)
        run.workdir = None  # handed over
        return True

    def _compiled_in(self, workdir: str) -> bool:
        """Keep the module a compile left in WORKDIR in the cache, and load
        it next.  False when it left none."""
        for suffix in loaders.LOADERS:
            if self._keep_in_cache(workdir, self.script.module + suffix, suffix):
                self._compiled = (workdir, suffix)
                return True
        return False

    def _keep_in_cache(self, workdir: str, source: str, suffix: str) -> bool:
        """If WORKDIR holds the module SOURCE (ending in SUFFIX), have it
        copied into the cache once the start is over (``keep_compiled``);
        False when it holds none."""
        if not _regular_file(os.path.join(workdir, source)):
            return False
        if self.digest is not None:
            self._to_keep = (workdir, source,
                             self.direct.cache.key(self.digest, suffix, self.script.module))
        return True

    def keep_compiled(self, leaving: Optional[str] = None) -> None:
        """Copy the module this start compiled into the cache: once its first
        output has been read, or at the latest before its working directory
        LEAVING is removed (then the copy is finished first).  Not during
        the start: the copy in the thread pool while the loader started and
        the first read waited cost first metrics ~5 ms (bench/README.md)."""
        pending = self._to_keep
        if leaving is None:
            if pending is not None:
                self._to_keep = None
                self._keeping = gevent.spawn(self._keep, *pending)
            return
        if self._keeping is not None:  # a copy under way: let it finish
            self._keeping.join()
            self._keeping = None
        if pending is not None and pending[0] == leaving:
            self._to_keep = None
            self._keep(*pending)

    def _keep(self, workdir: str, source: str, name: str) -> None:
        if self.direct.cache.store(workdir, source, name):
            log.info("cache: script=%s kept the compiled module for the next start",
                     self.script.name)

    def abandon(self) -> None:
        """The start ends before its compiled module was loaded: remove the
        compile's working directory."""
        pending, self._compiled = self._compiled, None
        if pending:
            if self._to_keep is not None and self._to_keep[0] == pending[0]:
                self._to_keep = None
            rmtree(pending[0])

    def spawn_error(self, argv: List[str], exc: Exception) -> Optional[str]:
        """A process of a start could not be forked, or a kept module not
        placed: then it is forgotten (None: compile next).  Else the
        failure's message."""
        reason = getattr(exc, "strerror", None) or str(exc)
        if self.from_cache:
            log.warning("cache: script=%s cannot use the kept module (%s); recompiling",
                        self.script.name, escape_line(reason))
            self.drop_kept()
            return None
        message = "cannot run %s: %s" % (argv[0], reason)
        log.error("spawn-failed: script=%s %s", self.script.name, escape_line(message))
        return message

    def drop_kept(self) -> None:
        """The kept module would not run: forget it."""
        if self._kept is not None:
            self.direct.cache.drop(self._kept)
            self._kept = None


def _regular_file(path: str) -> bool:
    """PATH is a regular file (not a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
