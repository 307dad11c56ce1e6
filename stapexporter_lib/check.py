"""``stap-exporter --check``: elaborate every script with systemtap (-p2).

The same trust rules as the server apply (trust.py): an executable script is
run directly here too, so an untrusted file is reported, never run.
Everything it prints (script names, systemtap's messages, paths) goes through
``escape_line``: a file name or a script's stderr must not drive the user's
terminal.

Owns the ``--check`` run: one line per script and the exit status.  Must
not start the server or run a script for longer than its elaboration.
"""

import os
import subprocess
import sys
from typing import List, Tuple

from . import trust
from .scripts.catalog import Catalog
from .cli import scripts_dir_refusal
from .logs import escape_line

CHECK_TIMEOUT = 120.0
ERROR_LINES = 3


def check_argv(script, stap: List[str]) -> List[str]:
    """Executable wrappers pass their arguments on to stap: append -p2.
    Plain scripts run through --stap."""
    if script.is_executable():
        return [script.path, "-p2"]
    return list(stap) + ["-p2", script.path]


def check_one(script, stap: List[str]) -> Tuple[bool, str]:
    """(ok, first error lines or "OK")."""
    argv = check_argv(script, stap)
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=CHECK_TIMEOUT,
                              cwd=os.path.dirname(script.path))
    except OSError as exc:  # missing, not executable, or a format the kernel cannot run
        return False, "cannot run %s: %s" % (argv[0], exc.strerror)
    except subprocess.TimeoutExpired:
        return False, "timed out after %.0f s" % CHECK_TIMEOUT
    if proc.returncode == 0:
        return True, "OK"
    # Split at newlines only: str.splitlines() would also cut at U+2028,
    # U+0085... which are escaped (shown) instead.
    lines = [l.strip() for l in proc.stderr.decode("utf-8", "replace").split("\n")
             if l.strip() and not l.startswith("WARNING:")]
    errors = [l for l in lines if "error" in l.lower()] or lines
    return False, "; ".join(errors[:ERROR_LINES]) or "exit status %d" % proc.returncode


def run_check(config, out=None) -> int:
    out = out or sys.stdout
    refusal = scripts_dir_refusal(config)
    if refusal:
        print("stap-exporter: error: %s" % refusal, file=sys.stderr)
        return 1
    catalog = Catalog(config.scripts_dir, follow_symlinks=config.follow_symlinks)
    catalog.rescan()
    if catalog.last_error:
        print(escape_line("stap-exporter: error: %s" % catalog.last_error), file=sys.stderr)
        return 2
    scripts = catalog.scripts()
    if not scripts:
        print(escape_line("stap-exporter: error: no *.stp scripts in %s" % config.scripts_dir),
              file=sys.stderr)
        return 1
    failed = 0
    for script in scripts:
        refusal = None if config.insecure_scripts else trust.script_refusal(script.path)
        if refusal:
            ok, text = False, "refused to run: %s" % refusal
        else:
            ok, text = check_one(script, config.stap)
        failed += not ok
        print(escape_line("%s: %s" % (script.name, text if ok else "FAILED: " + text)),
              file=out, flush=True)
    print("%d scripts checked, %d failed" % (len(scripts), failed), file=out)
    return 1 if failed else 0
