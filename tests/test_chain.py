"""The shell that runs a compile and then becomes the loader
(loaders.CHAIN_SCRIPT), on its own, with every POSIX shell this machine has:
/bin/sh (dash on Debian, bash on Fedora) and dash and bash by name.  The
command lines reach it as arguments and must arrive word for word.  When the
compiler prints the module's file name (as stap does once the module is
complete), the shell becomes the loader in the same process, on the copy
the compiler had put in place or, killed before that, on its temporary
directory's copy; the compiler is killed and is not the shell's child (no
zombie under the loader).  Without that line it ends with the compiler's
status and runs nothing else; SIGTERM is passed on to the compiler."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import pid_alive, wait_for
from stapexporter_lib.loaders import CHAIN_MARKER, CHAIN_SCRIPT, make_chain_output

SHELLS = sorted({path for path in ["/bin/sh"] + [shutil.which(n) for n in ("dash", "bash")]
                 if path})

# Words a shell would mangle if they ever reached it as text.
AWKWARD = ["a b", "$(touch pwned)", "`touch pwned`", "*", "'", '"', "x\ny", "-n", "", "$1 $@"]

# The stand-in compiler, in stap's order: the module is written in a
# temporary directory under $TMPDIR, its file name printed (unless "silent",
# or printed after the rename), then (after "pause" seconds) copied into
# place by a rename; then it lingers
# (stap's clean-up) or exits with the status it is given.  It records its
# pid and parent pid; on SIGTERM it cleans up (as stap removes its temporary
# files) and exits.
COMPILER = """\
import os, signal, sys, time
print_name, pause, then = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def cleanup(*_):
    open("cleaned-up", "w").close()
    sys.exit(1)
signal.signal(signal.SIGTERM, cleanup)
open("compiler.pid", "w").write("%d %d" % (os.getpid(), os.getppid()))
tmp = os.path.join(os.environ["TMPDIR"], "stapAb12Cd")
os.mkdir(tmp)
open(os.path.join(tmp, "m.bo"), "w").write("the module")
if print_name == "print":
    print("m.bo", flush=True)
elif print_name not in ("silent", "print-after-rename"):
    print(print_name, flush=True)
time.sleep(pause)
open("m.bo.tmp", "w").write("the module")
os.rename("m.bo.tmp", "m.bo")
open("in-place", "w").close()
if print_name == "print-after-rename":
    print("m.bo", flush=True)
if then == "linger":
    time.sleep(60)
sys.exit(int(then))
"""

# The stand-in loader: what it was given, its pid, how it finds SIGTERM,
# whether it has children, and the module it was given.
LOADER = """\
import os, sys
print(repr(sys.argv[1:]))
print(os.getpid())
try:
    os.waitpid(-1, os.WNOHANG)
    print("has children")
except ChildProcessError:
    print("no children")
print(open(sys.argv[-1]).read())
"""


def chain(shell, tmp_path, *compiler_args):
    make_chain_output(str(tmp_path))
    loader = [sys.executable, "-c", LOADER] + AWKWARD
    compiler = [sys.executable, "-c", COMPILER] + list(compiler_args)
    return subprocess.Popen([shell, "-c", CHAIN_SCRIPT, "stap-exporter-chain", str(len(loader)),
                             "m.bo"] + loader + compiler, cwd=str(tmp_path),
                            env=dict(os.environ, TMPDIR=str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def compiler_pids(tmp_path):
    """(pid, parent pid) of the stand-in compiler once it has started."""
    path = tmp_path / "compiler.pid"
    wait_for(lambda: path.exists() and path.read_text(), message="the compiler to start")
    pid, parent = path.read_text().split()
    return int(pid), int(parent)


def finished(proc, tmp_path):
    """(compiler pid, compiler's parent pid, stdout, stderr) of a chain run
    to its end."""
    try:
        compiler, parent = compiler_pids(tmp_path)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return compiler, parent, out, err


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("said,module", [("print-after-rename", "m.bo"),
                                          ("print", "stapAb12Cd/m.bo")])
def test_the_named_module_makes_the_shell_the_loader(shell, tmp_path, said, module):
    """Renamed into place by the time the shell acts: that copy is loaded.
    Killed before its rename (a 60 s pause): the temporary directory's copy,
    which the killed compiler can no longer remove."""
    proc = chain(shell, tmp_path, said, "0" if said == "print-after-rename" else "60", "linger")
    compiler, parent, out, err = finished(proc, tmp_path)
    lines = out.decode().splitlines()
    assert proc.returncode == 0, err
    assert eval(lines[0]) == AWKWARD + [module]  # noqa: S307 -- our own repr of a list of str
    assert int(lines[1]) == proc.pid  # the same process: exec, no fork
    # The compiler runs under the minder, never as the shell's child, so the
    # loader starts without waiting for the compiler's exit and no zombie of
    # it is left under the loader.
    assert parent != proc.pid
    assert lines[2] == "no children"
    assert lines[3] == "the module"
    assert (tmp_path / CHAIN_MARKER).read_text() == module + "\n"
    wait_for(lambda: not pid_alive(compiler), message="the compiler to be killed")
    assert (tmp_path / "in-place").exists() == (module == "m.bo")
    assert not (tmp_path / "pwned").exists()
    assert err == b""


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("said", ["silent", "m.ko", "m.bo.extra"])
@pytest.mark.parametrize("status", [0, 3])
def test_without_the_modules_name_it_ends_with_the_compilers_status(shell, tmp_path, said,
                                                                    status):
    proc = chain(shell, tmp_path, said, "0", str(status))
    _compiler, _parent, out, err = finished(proc, tmp_path)
    assert proc.returncode == status, err
    assert out == b""  # the loader never ran
    assert (tmp_path / "in-place").exists()  # the compiler ran to its end
    assert not (tmp_path / CHAIN_MARKER).exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_sigterm_is_passed_on_to_the_compiler(shell, tmp_path):
    """The shell passes SIGTERM on (stap then removes its temporary files)
    and dies of it, so the exporter sees a process stopped by SIGTERM."""
    proc = chain(shell, tmp_path, "silent", "60", "0")
    try:
        compiler, _parent = compiler_pids(tmp_path)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert out == b""
    wait_for(lambda: not pid_alive(compiler), message="the compiler to be gone")
    assert (tmp_path / "cleaned-up").exists()
