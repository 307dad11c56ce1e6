"""The shell that runs a compile and then becomes the loader
(loaders.CHAIN_SCRIPT), on its own, with every POSIX shell this machine has:
/bin/sh (dash on Debian, bash on Fedora) and dash and bash by name.  The
command lines reach it as arguments and must arrive word for word; SIGURG
turns it into the loader in the same process, with the compiler killed and
not its child (no zombie under the loader);
without SIGURG it ends with the compiler's status and runs nothing else;
SIGTERM is passed on to the compiler."""

import shutil
import signal
import subprocess
import sys

import pytest

from conftest import pid_alive, wait_for
from stapexporter_lib.loaders import CHAIN_SCRIPT

SHELLS = sorted({path for path in ["/bin/sh"] + [shutil.which(n) for n in ("dash", "bash")]
                 if path})

# Words a shell would mangle if they ever reached it as text.
AWKWARD = ["a b", "$(touch pwned)", "`touch pwned`", "*", "'", '"', "x\ny", "-n", "", "$1 $@"]

# The stand-in compiler: records its pid, puts a module in place, then
# lingers (stap's clean-up) or exits with the status it is given; on SIGTERM
# it cleans up (as stap removes its temporary files) and exits.
COMPILER = """\
import os, signal, sys, time
def cleanup(*_):
    open("cleaned-up", "w").close()
    sys.exit(1)
signal.signal(signal.SIGTERM, cleanup)
open("compiler.pid", "w").write("%d %d" % (os.getpid(), os.getppid()))
open("m.bo.tmp", "w").write("module")
os.rename("m.bo.tmp", "m.bo")
if sys.argv[1] == "linger":
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""

# The stand-in loader: what it was given, and how it finds SIGURG.
LOADER = """\
import os, sys
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
urg = 1 << (signal_number - 1)
print(repr(sys.argv[1:]))
print(os.getpid())
print("ignored" if int(fields["SigIgn"], 16) & urg else "default")
try:
    os.waitpid(-1, os.WNOHANG)
    print("has children")
except ChildProcessError:
    print("no children")
"""


def chain(shell, tmp_path, compiler_arg):
    loader = [sys.executable, "-c", "signal_number = %d\n" % signal.SIGURG + LOADER] + AWKWARD
    compiler = [sys.executable, "-c", COMPILER, compiler_arg]
    return subprocess.Popen([shell, "-c", CHAIN_SCRIPT, "stap-exporter-chain", str(len(loader))]
                            + loader + compiler, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def compiler_pids(tmp_path):
    """(pid, parent pid) of the stand-in compiler once its module is in place."""
    path = tmp_path / "compiler.pid"
    wait_for(lambda: path.exists() and path.read_text() and (tmp_path / "m.bo").exists(),
             message="the compiler's module")
    pid, parent = path.read_text().split()
    return int(pid), int(parent)


def signalled(shell, tmp_path, sig):
    """(process, compiler pid, compiler's parent pid, stdout, stderr) of a
    chain whose lingering compiler had put its module in place when the
    shell got SIG."""
    proc = chain(shell, tmp_path, "linger")
    try:
        compiler, parent = compiler_pids(tmp_path)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc, compiler, parent, out, err


@pytest.mark.parametrize("shell", SHELLS)
def test_sigurg_makes_the_shell_the_loader(shell, tmp_path):
    proc, compiler, parent, out, err = signalled(shell, tmp_path, signal.SIGURG)
    lines = out.decode().splitlines()
    assert proc.returncode == 0, err
    assert eval(lines[0]) == AWKWARD  # noqa: S307 -- our own repr of a list of str
    assert int(lines[1]) == proc.pid  # the same process: exec, no fork
    assert lines[2] == "default"      # SIGURG is not left ignored in the loader
    # The compiler runs under the minder, never as the shell's child, so the
    # loader starts without waiting for the compiler's exit and no zombie of
    # it is left under the loader.
    assert parent != proc.pid
    assert lines[3] == "no children"
    wait_for(lambda: not pid_alive(compiler), message="the lingering compiler to be killed")
    assert not (tmp_path / "pwned").exists()
    assert err == b""


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("status", [0, 3])
def test_without_sigurg_it_ends_with_the_compilers_status(shell, tmp_path, status):
    proc = chain(shell, tmp_path, str(status))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert out == b""  # the loader never ran
    assert (tmp_path / "m.bo").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_sigterm_is_passed_on_to_the_compiler(shell, tmp_path):
    """The shell passes SIGTERM on (stap then removes its temporary files)
    and dies of it, so the exporter sees a process stopped by SIGTERM."""
    proc, compiler, _parent, out, _ = signalled(shell, tmp_path, signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM
    assert out == b""
    wait_for(lambda: not pid_alive(compiler), message="the compiler to be gone")
    assert (tmp_path / "cleaned-up").exists()
