"""Which of the --stap command's options a runtime's loader takes, and the
loader's command line.

A plain script is compiled with ``STAP [options] -p4 -m MODULE FILE`` and
its module then runs under the runtime's loader alone (``stapbpf
MODULE.bo``, ``staprun MODULE.ko``), so that a running script costs the
host one small process instead of an idle stap driver and the loader.  The
options in --stap are sorted into those only the translator needs (the
runtime, the kernel build tree, include paths, macros...), those the loader
needs too or instead (``-v``, ``-w``, ``-o``, ``-x``, ``-c``, and for
staprun ``-s`` as ``-b`` and ``-G`` as module options), and the rest.  A
script whose options the loader cannot honour runs through the stap driver
as before; the reason is logged once.

A compile for the BPF runtime is one process from start to running script
(``chained_argv``): a small POSIX shell (``CHAIN_SCRIPT``, a constant: the
command lines reach it as arguments, never as shell text) runs the compile,
and when stap says its module is complete the shell has the compiler killed
(its remaining work is its own clean-up) and becomes the loader (exec),
keeping the exporter's death signal, without waiting for the exporter or for
the compiler's exit.  It leaves a marker file saying which module it loads,
so that the exporter keeps that module in its cache.  Otherwise (a failed
compile, a kernel module) the shell exits with the compiler's status, and
the exporter runs the loader itself, as for a kernel module.  This saves the
exporter a fork per start, the dearest part of a start that is not stap's.

Owns that classification and the loader command lines.  Must not start,
signal or wait for anything, or decide which script runs how
(``launch.py``).
"""

import logging
import os
import shutil
from typing import Dict, List, Optional, Set

from .logs import escape_line

log = logging.getLogger("stap-exporter")

# Compiled module suffix -> the runtime's loader.
LOADERS = {".bo": "stapbpf", ".ko": "staprun"}

# The shell that runs a compile and then becomes the loader, with arguments
# N, the module's file name, the loader's N words before it, then the
# compile's words; it runs in the run's working directory, which holds the
# FIFO ``CHAIN_OUTPUT`` (made by ``make_chain_output``) and is the compile's
# TMPDIR.  The compiler runs under a subshell (the "minder"), never as the
# shell's own child.  stap prints the module's file name on its standard
# output (the FIFO) once the module is complete in its temporary directory,
# before copying it to the working directory and removing that directory;
# the minder reads that line, SIGKILLs the compiler at once (what is left of
# its work is that copy and clean-up, and freeing tens of MB), picks the
# module's complete copy, writes its path to ``CHAIN_MARKER`` and exits; the
# shell then execs the loader on it.  The copy in the working directory is
# taken if stap had renamed it into place (then it may also have started
# removing its temporary directory); else stap was killed before that rename
# and, its next step never taken, the temporary directory's copy stays.  No
# step waits for the exporter, and the compiler's exit goes on beside the
# loader's start; the orphan is reaped by the exporter (a child subreaper), so
# no zombie hangs under the loader.  Any other line, or none (a failed
# compile, a kernel module), and the shell ends with the compiler's status.
# SIGTERM (the exporter's stop, or its death signal) is passed on to the
# compiler (stap then removes its temporary files), and the shell dies of it
# as the compiler alone would have.
CHAIN_SHELL = "/bin/sh"
CHAIN_OUTPUT = "chain.out"
CHAIN_MARKER = "chain.loading"
CHAIN_SCRIPT = """\
trap 'kill -TERM "$c" 2>/dev/null; trap - TERM; kill -TERM $$' TERM
n=$1; m=$2; shift 2
(
trap 'kill -TERM "$s" 2>/dev/null; exit 143' TERM
shift "$n"; "$@" >@OUTPUT@ & s=$!
IFS= read -r line <@OUTPUT@
[ "$line" = "$m" ] || { wait "$s"; exit; }
kill -KILL "$s"
[ -f "$m" ] || for d in stap??????/; do [ -f "$d$m" ] && m=$d$m; done
printf '%s\\n' "$m" >@MARKER@
) &
c=$!
i=0
for a; do shift; [ "$i" -lt "$n" ] && set -- "$@" "$a"; i=$((i+1)); done
wait "$c"; s=$?
[ -f @MARKER@ ] || exit "$s"
IFS= read -r m <@MARKER@
exec "$@" "$m"
""".replace("@OUTPUT@", CHAIN_OUTPUT).replace("@MARKER@", CHAIN_MARKER)
CHAINED_SUFFIX = ".bo"

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
        self._chain_ok = False
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

    def chained_argv(self, module: str, compile_argv: List[str]) -> Optional[List[str]]:
        """The command line of COMPILE_ARGV becoming the BPF loader once its
        module is complete (``CHAIN_SCRIPT``; its working directory needs
        ``make_chain_output``), or None when that loader would refuse these
        options, or there is no shell or no stap to run."""
        if not self._chainable():
            return None  # the exporter's own spawn says plainly what it cannot run
        module_file = module + CHAINED_SUFFIX
        loader = self.loader_argv(CHAINED_SUFFIX, module_file)
        if loader[-1] != module_file:  # the BPF loader takes no words after the module
            return None
        return ([CHAIN_SHELL, "-c", CHAIN_SCRIPT, "stap-exporter-chain", str(len(loader) - 1),
                 module_file] + loader[:-1] + compile_argv)

    def _chainable(self) -> bool:
        """Whether compiles can be chained (looked up until it is so; then
        remembered, as the loaders' paths are)."""
        if not self._chain_ok:
            self._chain_ok = (not self.loader_refusal(CHAINED_SUFFIX)
                              and os.access(CHAIN_SHELL, os.X_OK)
                              and shutil.which(self.stap0) is not None)
        return self._chain_ok

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


def make_chain_output(workdir: str) -> None:
    """The FIFO a chained compile's standard output goes through, in its new
    working directory WORKDIR (which only the exporter's user can enter;
    ``ChildRun.spawn`` makes it)."""
    os.mkfifo(os.path.join(workdir, CHAIN_OUTPUT), 0o600)


def chain_marker_path(text: str, module_file: str) -> Optional[str]:
    """The module path a chain's marker file (TEXT) names, relative to the
    working directory, if it is one the chain can write: MODULE_FILE, or
    MODULE_FILE in stap's temporary directory; else None."""
    path = text[:-1] if text.endswith("\n") else text
    if path == module_file:
        return path
    head, _, tail = path.partition("/")
    if (tail == module_file and len(head) == 10 and head.startswith("stap")
            and head[4:].isalnum() and head[4:].isascii()):
        return path
    return None


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
