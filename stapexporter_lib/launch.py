"""What a start of a script runs: the command line, and the compiled module
kept for the next start.

Before each start the script file is read (in the hub's thread pool): its
digest keys the compiled-module cache and its ``// prometheus: TYPE/HELP``
comments give the declarations.  An executable script runs directly with
``-m MODULE`` appended; a plain one runs its kept compiled module if the
cache has one for this content, else ``STAP -m MODULE FILE``.  After a full
compile that produced output, the module is kept for the next start.

Owns those choices for one script.  Must not spawn, signal or wait for
processes (``child.py``), or decide when to start (``session.py``).
"""

import logging
from typing import List, Optional

import gevent

from . import compiled
from .catalog import Script
from .declarations import Annotator, parse_declarations

log = logging.getLogger("stap-exporter")

# The most of a script file read for its digest and declarations.
MAX_SCRIPT_BYTES = 4 * 1024 * 1024


class Launch:
    """The command lines of one script's starts."""

    def __init__(self, script: Script, stap: List[str], module_cache):
        self.script = script
        self.stap = stap
        self.module_cache = module_cache  # compiled.ModuleCache, or None
        self.digest: Optional[str] = None  # of the script file at the last start
        self.from_cache = False             # this run uses a kept compiled module

    def read_script(self) -> Optional[Annotator]:
        """Read the script file (in the thread pool); returns its declarations'
        annotator, None when it declares nothing or cannot be read."""
        def read():
            with open(self.script.path, "rb") as f:
                return f.read(MAX_SCRIPT_BYTES)
        try:
            content = gevent.get_hub().threadpool.apply(read)
        except OSError as exc:
            log.warning("declarations: script=%s cannot read the script: %s", self.script.name,
                        exc.strerror)
            self.digest = None
            return None
        self.digest = compiled.digest(content)
        annotator = Annotator(parse_declarations(content.decode("utf-8", "replace")))
        return annotator if annotator else None

    def argv(self) -> List[str]:
        """The command line of the next start."""
        module_args = ["-m", self.script.module]
        self.from_cache = False
        if self.script.is_executable():
            return [self.script.path] + module_args
        cache = self.module_cache
        if cache is not None and self.digest is not None:
            kept = cache.argv(self.script.module, self.digest)
            if kept is not None:
                self.from_cache = True
                return kept
        return list(self.stap) + module_args + [self.script.path]

    def drop_kept(self) -> None:
        """The kept module would not run: forget it."""
        self.module_cache.drop(self.script.module)

    def keep_compiled(self, workdir: Optional[str]) -> None:
        """After a full compile that produced output, keep the module in
        WORKDIR for the next start (callers know it produced output and is
        not stopping for good)."""
        cache = self.module_cache
        if (cache is not None and workdir and not self.from_cache
                and self.digest is not None and not self.script.is_executable()):
            if cache.keep(self.script.module, self.digest, workdir):
                log.info("cache: script=%s kept the compiled module for the next start",
                         self.script.name)
