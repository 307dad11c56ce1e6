"""``stap-exporter --check``: every script elaborated with systemtap (-p2), one
line per script, exit status 1 when any failed.  Run as a user would, as a
subprocess from the repository root: first with the stand-in fakestap, then
(realstap-marked) with the real SystemTap."""

import os
import subprocess
import sys

import pytest

from conftest import EXPORTER, FAKESTAP, ROOT, write_script

import realstap

GOOD_STP = """\
global ticks%
probe timer.ms(100) { ticks[cpu()]++ }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
"""

BROKEN_STP = """\
global ticks%
probe timer.ms(100) { ticks[cpu()]++; no_such_function_xyz() }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
"""


class Result:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out = proc.stdout.decode("utf-8", "replace")
        self.err = proc.stderr.decode("utf-8", "replace")

    def lines(self):
        return self.out.splitlines()

    def line_for(self, name):
        found = [l for l in self.lines() if l.startswith(name + ": ")]
        assert len(found) == 1, "no single line for %s in:\n%s\n%s" % (name, self.out, self.err)
        return found[0]

    def __repr__(self):
        return "<check rc=%s out=%r err=%r>" % (self.rc, self.out, self.err)


def run_check(scripts, stap, timeout=120):
    cmd = [sys.executable, EXPORTER, "--check", "-s", str(scripts), "--stap", stap]
    proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)
    return Result(proc)


def write_plain(directory, name, text):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def scripts(tmp_path):
    d = tmp_path / "scripts"
    d.mkdir()
    return d


# ------------------------------------------------------------------ fakestap

def test_good_script_ok_exit_0(scripts):
    write_script(scripts, "good.stp")
    r = run_check(scripts, FAKESTAP)
    assert r.rc == 0, r
    assert r.line_for("good.stp") == "good.stp: OK", r
    assert "Traceback" not in r.err, r


def test_failed_script_reported_exit_1(scripts):
    write_script(scripts, "good.stp")
    write_script(scripts, "bad.stp", "fail")
    r = run_check(scripts, FAKESTAP)
    assert r.rc == 1, r
    assert r.line_for("good.stp") == "good.stp: OK", r
    assert r.line_for("bad.stp").startswith("bad.stp: FAILED: semantic error"), r
    assert "fake failure in bad.stp" in r.line_for("bad.stp"), r


def test_all_failed_exit_1(scripts):
    write_script(scripts, "bad.stp", "fail")
    r = run_check(scripts, FAKESTAP)
    assert r.rc == 1, r
    assert r.line_for("bad.stp").startswith("bad.stp: FAILED: semantic error"), r


def test_every_script_gets_exactly_one_line(scripts):
    names = ["a.stp", "b-autostart.stp", "c.stp"]
    for name in names:
        write_script(scripts, name, "fail" if name == "c.stp" else "")
    r = run_check(scripts, FAKESTAP)
    assert r.rc == 1, r
    for name in names:
        r.line_for(name)
    assert r.line_for("a.stp") == "a.stp: OK"
    assert r.line_for("b-autostart.stp") == "b-autostart.stp: OK"
    assert r.line_for("c.stp").startswith("c.stp: FAILED: ")


def test_terminal_escapes_in_names_and_stderr_are_printed_escaped(scripts):
    """A script named with ESC sequences (and failing
    with them on stderr) cannot retitle or recolour the user's terminal."""
    title = "\x1b]0;OWNED\x07x.stp"
    red = "\x1b[31mred\u009b2J\u2028.stp"
    write_script(scripts, title)
    write_script(scripts, red, "fail")
    proc = subprocess.run([sys.executable, EXPORTER, "--check", "-s", str(scripts), "--stap",
                           FAKESTAP], cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    out = proc.stdout.decode("utf-8")
    assert proc.returncode == 1, out
    for raw in ("\x1b", "\x07", "\u009b", "\u2028"):
        assert raw not in out, repr(out)
    lines = out.splitlines()
    assert "\\x1b]0;OWNED\\x07x.stp: OK" in lines, lines
    failed = [l for l in lines if l.startswith("\\x1b[31mred\\x9b2J\\u2028.stp: FAILED: ")]
    assert len(failed) == 1, lines
    # The script's stderr named the script: escaped there too.
    assert "fake failure in \\x1b[31mred\\x9b2J\\u2028.stp" in failed[0], failed


def test_empty_directory_one_line_error(scripts):
    r = run_check(scripts, FAKESTAP)
    assert r.rc != 0, r
    err = r.err.strip().splitlines()
    assert len(err) == 1, r
    assert "error" in err[0] and "Traceback" not in r.err, r
    assert str(scripts) in err[0] or "no" in err[0], r


def test_executable_wrapper_runs_with_p2(scripts, tmp_path):
    # Shebang on fakestap: the kernel runs `fakestap SCRIPT -p2`; without -p2
    # (and without -m) fakestap would fail with "no -m MODULE".
    write_script(scripts, "wrapped.stp", executable=True)
    write_script(scripts, "wrapped-bad.stp", "fail", executable=True)
    # --stap is not used for executable scripts: a missing one does not matter.
    r = run_check(scripts, str(tmp_path / "no-such-stap"))
    assert r.line_for("wrapped.stp") == "wrapped.stp: OK", r
    assert r.line_for("wrapped-bad.stp").startswith("wrapped-bad.stp: FAILED: semantic error"), r
    assert r.rc == 1, r


def test_executable_wrapper_gets_exactly_p2(scripts, tmp_path):
    log = tmp_path / "argv.log"
    path = scripts / "recorder.stp"
    path.write_text("#!/bin/sh\nprintf '%%s\\n' \"$@\" > %s\nexit 0\n" % log)
    os.chmod(str(path), 0o755)
    r = run_check(scripts, FAKESTAP)
    assert r.rc == 0, r
    assert r.line_for("recorder.stp") == "recorder.stp: OK", r
    assert log.read_text().splitlines() == ["-p2"]


def test_plain_script_missing_stap_fails(scripts, tmp_path):
    write_script(scripts, "good.stp")
    r = run_check(scripts, str(tmp_path / "no-such-stap"))
    assert r.rc == 1, r
    assert r.line_for("good.stp").startswith("good.stp: FAILED: "), r
    assert "Traceback" not in r.err, r


def test_executable_script_the_kernel_cannot_run_is_one_line(scripts):
    # Executable, but neither #! nor a binary: execve() fails with ENOEXEC.
    path = write_plain(scripts, "noexec.stp", GOOD_STP)
    os.chmod(path, 0o755)
    write_script(scripts, "good.stp")
    r = run_check(scripts, FAKESTAP)
    assert r.rc == 1, r
    assert r.line_for("noexec.stp") == ("noexec.stp: FAILED: cannot run %s: Exec format error"
                                        % path), r
    assert r.line_for("good.stp") == "good.stp: OK", r
    assert "Traceback" not in r.err + r.out, r


# ------------------------------------------------------------------ real systemtap

@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    reason = realstap.skip_reason()
    if reason:
        pytest.skip(reason)
    return realstap.prepare(tmp_path_factory.mktemp("realstap"))


@pytest.mark.realstap
def test_real_good_script_ok(rs, scripts):
    write_plain(scripts, "ticks.stp", GOOD_STP)
    before = sorted(os.listdir(str(scripts)))
    r = run_check(scripts, rs.stap)
    assert r.rc == 0, r
    assert r.line_for("ticks.stp") == "ticks.stp: OK", r
    assert "1 scripts checked, 0 failed" in r.out, r
    # -p2 compiles nothing: the scripts directory is unchanged.
    assert sorted(os.listdir(str(scripts))) == before


@pytest.mark.realstap
def test_real_broken_script_failed_with_systemtap_text(rs, scripts):
    write_plain(scripts, "ticks.stp", GOOD_STP)
    write_plain(scripts, "broken.stp", BROKEN_STP)
    r = run_check(scripts, rs.stap)
    assert r.rc == 1, r
    assert r.line_for("ticks.stp") == "ticks.stp: OK", r
    line = r.line_for("broken.stp")
    assert line.startswith("broken.stp: FAILED: semantic error"), r
    assert "unresolved function no_such_function_xyz" in line, r


@pytest.mark.realstap
def test_real_executable_wrapper(rs, scripts):
    rs.write_wrapper_script(scripts / "wrapped.stp", GOOD_STP)
    rs.write_wrapper_script(scripts / "wrapped-broken.stp", BROKEN_STP)
    r = run_check(scripts, "/nonexistent/stap")
    assert r.line_for("wrapped.stp") == "wrapped.stp: OK", r
    line = r.line_for("wrapped-broken.stp")
    assert line.startswith("wrapped-broken.stp: FAILED: semantic error"), r
    assert "no_such_function_xyz" in line, r
    assert r.rc == 1, r


@pytest.mark.realstap
def test_real_bundled_bpf_examples_pass(rs, scripts):
    examples = os.path.join(ROOT, "examples", "bpf")
    r = run_check(examples, rs.stap)
    assert r.rc == 0, r
    names = sorted(n for n in os.listdir(examples) if n.endswith(".stp"))
    assert names
    for name in names:
        assert r.line_for(name) == "%s: OK" % name, r
