"""Reusing a script's compiled module across restarts.

``stap -m MODULE`` turns off systemtap's own compile cache, so every restart
(after a keepalive stop, say) would pay for a full translation and compile:
about a second for the BPF runtime and tens of seconds for the kernel-module
runtime.  After a run of a plain (non-executable) script that produced output,
the module it compiled (``MODULE.bo`` or ``MODULE.ko``, left in the private
working directory) is kept here, keyed by the script's content.  The next start
runs it directly with the runtime's own loader (``stapbpf MODULE.bo`` or
``staprun MODULE.ko``); if the script changed, the module is recompiled.  If a
kept module fails before producing output, it is thrown away and the script is
compiled afresh at once.

The cache lives in a directory of this exporter process (module names carry
the exporter's pid, so they cannot be shared between processes) and is removed
at exit; after a crash, the start-up sweep removes it.

Owns the cache directory and its entries.  Must not decide when a module is
kept or run (``launch.py``) or start anything.
"""

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from typing import Dict, List, Optional, Tuple

import gevent

from . import trust
from . import naming

log = logging.getLogger("stap-exporter")

# Compiled module suffix -> the runtime's loader.
LOADERS = {".bo": "stapbpf", ".ko": "staprun"}


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class ModuleCache:
    """Compiled modules of this exporter's scripts, by module name."""

    def __init__(self, root: Optional[str] = None):
        self.root = root or tempfile.gettempdir()
        self._dir: Optional[str] = None
        self._entries: Dict[str, Tuple[str, str]] = {}  # module -> (digest, path)
        self._loaders: Dict[str, Optional[str]] = {}

    def argv(self, module: str, script_digest: str) -> Optional[List[str]]:
        """The command that runs MODULE's kept compiled module, or None when
        there is none for this content of the script (or no loader)."""
        entry = self._entries.get(module)
        if entry is None:
            return None
        kept_digest, path = entry
        if kept_digest != script_digest:
            self.drop(module)
            return None
        loader = self._loader(os.path.splitext(path)[1])
        return [loader, path] if loader else None

    def keep(self, module: str, script_digest: str, workdir: str) -> bool:
        """Move MODULE's compiled module out of WORKDIR into the cache."""
        for suffix in LOADERS:
            source = os.path.join(workdir, module + suffix)
            try:
                # Only a regular file (the script could leave anything there).
                if not stat.S_ISREG(os.lstat(source).st_mode):
                    continue
                target = os.path.join(self._directory(), module + suffix)
                _in_pool(shutil.move, source, target)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cache: module=%s cannot keep %s: %s", module, source,
                            exc.strerror)
                return False
            self._entries[module] = (script_digest, target)
            return True
        return False

    def drop(self, module: str) -> None:
        entry = self._entries.pop(module, None)
        if entry is not None:
            try:
                _in_pool(os.unlink, entry[1])
            except OSError:
                pass

    def clear(self) -> None:
        self._entries.clear()
        if self._dir is not None:
            try:
                trust.remove_tree(self._dir)
            except (OSError, trust.Untrusted) as exc:
                log.warning("cache: cannot remove %s: %s", self._dir, exc)
            self._dir = None

    def _directory(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=naming.cache_prefix(os.getpid()),
                                         dir=self.root)
        return self._dir

    def _loader(self, suffix: str) -> Optional[str]:
        if suffix not in self._loaders:
            self._loaders[suffix] = shutil.which(LOADERS.get(suffix, ""))
        return self._loaders[suffix]


def _in_pool(func, *args):
    return gevent.get_hub().threadpool.apply(func, args)
