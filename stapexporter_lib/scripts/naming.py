"""The names this exporter gives to what it creates, and how to read them back.

Owns the one definition of each naming rule: systemtap module names
(``stapexp_<pid>_<slug>[_<crc>]``), private working directories
(``stap-exporter.<pid>.<module>.*``), the compiled-module cache directory
(``stap-exporter.<pid>.cache.*``), their parsing back to the owning
exporter's pid (for the start-up sweep), and the "kernel-owned" test for
directories under /proc.  Every name carries the owner's pid so that two
exporters on one host never collide and a later one can recognise a dead
one's leftovers.

Pure functions and constants: must not touch the file system or processes.
"""

import re
import zlib
from typing import Optional, Set

SCRIPT_SUFFIX = ".stp"
MODULE_PREFIX = "stapexp_"
# The longest module name we make (the kernel and systemtap limit them).
MODULE_MAX = 55
# A script's own module name leaves room for the mark of its edited
# versions' name (``version_module``).
_OWN_MAX = MODULE_MAX - 1

# Module names of ours: prefix, owning exporter's pid, script slug.
MODULE_RE = re.compile(r"^" + MODULE_PREFIX + r"([0-9]+)_[a-z0-9_]+$")

WORKDIR_PREFIX = "stap-exporter."
# Working and cache directories of ours: prefix, owning exporter's pid, rest.
WORKDIR_RE = re.compile(r"^" + re.escape(WORKDIR_PREFIX) + r"([0-9]+)\.")

# Kernel-owned directories: their entries come and go with the kernel's
# modules, never to be removed by us.
KERNEL_ROOT = "/proc"


def module_name(script_name: str, pid: int, used: Set[str]) -> str:
    """A valid (``[a-z0-9_]``, at most _OWN_MAX), readable module name for
    SCRIPT_NAME of exporter PID that is not in USED.  When the slug had to be
    altered or shortened, or is taken, a checksum of the exact file name tells
    such names apart."""
    base = script_name[:-len(SCRIPT_SUFFIX)]
    slug = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "script"
    head = "%s%d_" % (MODULE_PREFIX, pid)
    module = head + slug
    if slug == base and len(module) <= _OWN_MAX and module not in used:
        return module
    salt = 0
    while True:
        digest = "%08x" % zlib.crc32(("%s\0%d" % (script_name, salt))
                                     .encode("utf-8", "surrogateescape"))
        room = _OWN_MAX - len(head) - len(digest) - 1
        module = "%s%s_%s" % (head, slug[:room].rstrip("_") or "s", digest)
        if module not in used:
            return module
        salt += 1


def version_module(module: str, version: int) -> str:
    """The module name VERSION of a script runs as, MODULE being its own:
    versions take turns between two names, so that an edited version starts
    beside the running one under a name of its own.  The second name has a
    second underscore after the pid, which no slug starts with: it is no
    other script's name, and the start-up sweep knows it as ours."""
    if version % 2 == 0:
        return module
    head, _, slug = module[len(MODULE_PREFIX):].partition("_")
    return "%s%s__%s" % (MODULE_PREFIX, head, slug)


def workdir_prefix(pid: int, module: str) -> str:
    """The prefix (for mkdtemp) of a private working directory of MODULE."""
    return "%s%d.%s." % (WORKDIR_PREFIX, pid, module)


def cache_prefix(pid: int) -> str:
    """The prefix (for mkdtemp) of exporter PID's compiled-module cache."""
    return "%s%d.cache." % (WORKDIR_PREFIX, pid)


# Linux never hands out a pid above this (PID_MAX_LIMIT on 64-bit systems);
# a larger number in a name cannot be an exporter's pid.
PID_MAX_LIMIT = 4 * 1024 * 1024


def owner_pid(text: str) -> Optional[int]:
    """The pid in a name, or None when it cannot be one (huge, zero)."""
    if not text.isdigit() or len(text) > len(str(PID_MAX_LIMIT)):
        return None
    pid = int(text)
    return pid if 0 < pid <= PID_MAX_LIMIT else None


def kernel_owned(path: str) -> bool:
    """True for /proc and what is below it (an absolute, normalised PATH)."""
    return path == KERNEL_ROOT or path.startswith(KERNEL_ROOT + "/")
