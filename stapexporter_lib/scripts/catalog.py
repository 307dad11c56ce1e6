"""The scripts directory: which ``*.stp`` files exist and what they are called.

The catalog maps URL names (``foo.stp``) to files and gives every script a
systemtap module name that is valid (``[a-z0-9_]``, at most 55 characters),
unique within this exporter process, and stable for its lifetime.  Module names
carry the exporter's pid so that two exporters on one host never collide and a
later exporter can recognise (and clean) the leftovers of a dead one.

Owns the name -> script mapping and when to rescan (the naming rules are in
``naming.py``).  Must not start or signal anything, or read scripts' output.
"""

import logging
import os
import stat
from typing import Dict, List, Optional, Tuple

from .naming import SCRIPT_SUFFIX as SUFFIX, module_name

log = logging.getLogger("stap-exporter")

AUTOSTART_MARK = "autostart"


class Script:
    """One servable script file."""

    __slots__ = ("name", "path", "module", "autostart")

    def __init__(self, name: str, path: str, module: str):
        self.name = name
        self.path = path
        self.module = module
        self.autostart = AUTOSTART_MARK in name

    def is_executable(self) -> bool:
        """Executable files run directly; others run through ``--stap``."""
        return os.access(self.path, os.X_OK)

    def __repr__(self):
        return "Script(%r, module=%r)" % (self.name, self.module)


def valid_name(name: str) -> bool:
    """True when NAME can only name a file directly inside the directory."""
    return (name.endswith(SUFFIX) and len(name) > len(SUFFIX)
            and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name
            and len(name) <= 255)


class Catalog:
    """Names -> scripts for one directory; ``rescan()`` refreshes it."""

    def __init__(self, directory: str, pid: Optional[int] = None,
                 follow_symlinks: bool = False):
        self.directory = directory
        self.follow_symlinks = follow_symlinks
        self.pid = os.getpid() if pid is None else pid
        self._scripts: Dict[str, Script] = {}
        self._modules: Dict[str, str] = {}  # name -> module, never forgotten
        self._used_modules = set()
        self.last_error: Optional[str] = None

    def get(self, name: str) -> Optional[Script]:
        return self._scripts.get(name)

    def names(self) -> List[str]:
        return sorted(self._scripts)

    def scripts(self) -> List[Script]:
        return [self._scripts[n] for n in sorted(self._scripts)]

    def __len__(self):
        return len(self._scripts)

    def lookup(self, name: str) -> Optional[Script]:
        """The script called NAME, rescanning when NAME is not known yet but a
        file of that name now exists (so new scripts need no restart)."""
        script = self._scripts.get(name)
        if script is not None or not valid_name(name):
            return script
        if self._is_script_file(os.path.join(self.directory, name), quiet=True):
            self.rescan()
        return self._scripts.get(name)

    def still_valid(self, script: Script) -> bool:
        """True if SCRIPT's file is still a servable script (checked before
        each start: it may have been removed or re-pointed)."""
        return self._is_script_file(script.path, quiet=True)

    def check_directory(self) -> Optional[str]:
        """None if the directory is readable now, else why not."""
        if not os.path.isdir(self.directory) or \
                not os.access(self.directory, os.R_OK | os.X_OK):
            return "cannot read scripts directory %s" % self.directory
        return self.last_error

    def rescan(self) -> Tuple[List[str], List[str]]:
        """Re-read the directory.  Returns (added, removed) names.  When the
        directory cannot be read, keeps the known scripts, records the reason
        in ``last_error`` and logs it."""
        try:
            entries = os.listdir(self.directory)
        except OSError as exc:
            self.last_error = "cannot read scripts directory %s: %s" % (
                self.directory, exc.strerror)
            log.error("rescan-failed: %s", self.last_error)
            return [], []
        if self.last_error:
            log.info("rescan: scripts directory %s is readable again", self.directory)
        self.last_error = None
        found = {}
        for name in entries:
            if not valid_name(name):
                continue
            path = os.path.join(self.directory, name)
            if not self._is_script_file(path):
                continue
            script = self._scripts.get(name)
            found[name] = script if script is not None else Script(
                name, path, self._module_for(name))
        added = sorted(set(found) - set(self._scripts))
        removed = sorted(set(self._scripts) - set(found))
        self._scripts = found
        return added, removed

    def _is_script_file(self, path: str, quiet: bool = False) -> bool:
        """A regular file, or a symbolic link to one inside the directory
        (anywhere with follow_symlinks)."""
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # follows symlinks
                return False
        except OSError:
            return False
        if self.follow_symlinks or not os.path.islink(path):
            return True
        real = os.path.realpath(path)
        inside = os.path.realpath(self.directory) + os.sep
        if real.startswith(inside):
            return True
        if not quiet:
            log.warning("rescan: ignoring %s: it links outside the scripts directory"
                        " (see --follow-symlinks)", os.path.basename(path))
        return False

    def _module_for(self, name: str) -> str:
        module = self._modules.get(name)
        if module is None:
            module = module_name(name, self.pid, self._used_modules)
            self._modules[name] = module
            self._used_modules.add(module)
        return module
