"""The way to a script is checked, component by component, end to end.

An administrator's link in the scripts directory may lead through a
directory or a link that another user controls; that user could re-point it
between the exporter's check and its use of the file.  Every directory and
every link on the way must be trusted like the script itself, and the
refusal names the component at fault.  A real unprivileged account (alice)
owns the links; the stand-in fakestap is the compiler.
"""

import os
import re

import pytest

from conftest import Exporter, stop_and_check, write_script
from localattack import Secret, attacker, shared  # noqa: F401 (fixtures)


@pytest.fixture
def start(dirs):
    started = []

    def _start(args=()):
        exp = Exporter(dirs[0], dirs[1], args=args)
        started.append(exp)
        return exp
    yield _start
    for exp in started:
        stop_and_check(exp)


@pytest.fixture
def home(attacker, shared):
    """alice's own directory, in a sticky directory as /home would hold it."""
    path = os.path.join(shared, "alice")
    attacker.sh("mkdir -m 0755 %s" % path)
    return path


def root_dir(shared, name):
    path = os.path.join(shared, name)
    os.mkdir(path, 0o755)
    return path


def assert_refused_at(exp, script, component, attacker):
    """SCRIPT is refused, naming COMPONENT (what alice controls), and never
    ran."""
    r = exp.get("/" + script)
    assert r.status == 403, r
    assert re.search(r"refused to run %s: %s (\(a symbolic link on the way to \S+\) )?is owned"
                     r" by uid %d" % (re.escape(script), re.escape(component), attacker.uid),
                     r.text), r.text
    exp.wait_log(r"event=refused script=%s .*%s" % (re.escape(script), re.escape(component)))
    assert "script=%s pid=" % script not in exp.log_text()  # nothing compiled or spawned
    assert "refused to run %s" % script in exp.get("/").text


def test_a_link_another_user_owns_on_the_way_to_a_script_is_refused(
        dirs, start, attacker, home, shared):
    """scripts/x.stp -> ~alice/current/x.stp, where alice's `current` points
    at a root-owned directory: the target is root's, but alice could
    re-point `current` at her own script between check and run."""
    scripts, _ = dirs
    real = root_dir(shared, "real")
    write_script(real, "x.stp")
    attacker.sh("ln -s %s %s/current" % (real, home))
    os.symlink(os.path.join(home, "current", "x.stp"), str(scripts / "x.stp"))
    write_script(scripts, "plain.stp")
    exp = start(["--follow-symlinks"])
    # Her home directory is the first component she controls.
    assert_refused_at(exp, "x.stp", home, attacker)
    assert exp.get_until("/plain.stp").status == 200  # the rest keeps serving


def test_a_chain_back_into_the_scripts_directory_is_checked_too(
        dirs, start, attacker, shared):  # noqa: F811
    """A link whose chain resolves back inside the scripts directory needs
    no --follow-symlinks; a link alice owns in the middle of it (here in a
    root-owned directory) is refused all the same."""
    scripts, _ = dirs
    write_script(scripts, "real.stp")
    links = root_dir(shared, "links")
    cur = os.path.join(links, "cur")
    os.symlink(str(scripts), cur)
    os.lchown(cur, attacker.uid, attacker.gid)
    os.symlink(os.path.join(cur, "real.stp"), str(scripts / "inner.stp"))
    exp = start()
    assert_refused_at(exp, "inner.stp", cur, attacker)
    assert exp.get_until("/real.stp").status == 200


def test_a_directory_another_user_can_write_on_the_way_is_refused(
        dirs, start, attacker, shared):
    """A root-owned link through a directory alice may write (she could
    swap what lies below it): refused, naming the directory."""
    scripts, _ = dirs
    open_dir = os.path.join(shared, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o777)
    inner = root_dir(open_dir, "inner")
    write_script(inner, "y.stp")
    os.symlink(os.path.join(inner, "y.stp"), str(scripts / "y.stp"))
    exp = start(["--follow-symlinks"])
    r = exp.get("/y.stp")
    assert r.status == 403, r
    assert "%s is writable by group and others (mode 0777)" % open_dir in r.text, r.text


def test_a_root_only_file_behind_a_users_link_is_never_read(dirs, start, attacker, home,
                                                            shared):
    """alice points her link at a directory holding a root-only file: the
    walk stops at her link, before anything is read, so nothing of the file
    reaches an answer, the index page or the log."""
    scripts, _ = dirs
    vault = root_dir(shared, "vault")
    os.chmod(vault, 0o700)
    secret = Secret(vault)
    os.rename(secret.path, os.path.join(vault, "s.stp"))
    attacker.sh("ln -s %s %s/peek" % (vault, home))
    os.symlink(os.path.join(home, "peek", "s.stp"), str(scripts / "s.stp"))
    exp = start(["--follow-symlinks"])
    r = exp.get("/s.stp")
    assert r.status == 403, r
    secret.assert_not_in(r.text, exp.get("/").text, exp.log_text())


def test_what_runs_is_the_private_copy_of_the_bytes_checked(dirs, start):
    """The compiler and an executable wrapper run a copy of the checked
    bytes in the start's private working directory, never the path: an edit
    of the file after the start changes nothing in the running copy."""
    scripts, _ = dirs
    write_script(scripts, "w.stp", executable=True)
    exp = start()
    assert exp.get_until("/w.stp").status == 200
    pid = int(re.search(r"event=spawned script=w\.stp pid=(\d+)",
                        exp.wait_log(r"event=spawned script=w\.stp ")).group(1))
    workdir = os.readlink("/proc/%d/cwd" % pid)
    copy = os.path.join(workdir, "w.stp")
    with open(str(scripts / "w.stp")) as original, open(copy) as private:
        assert private.read() == original.read()
    st = os.stat(copy)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    assert os.stat(workdir).st_mode & 0o777 == 0o700
    with open(str(scripts / "w.stp"), "a") as f:
        f.write("# edited\n")
    with open(copy) as private:
        assert "# edited" not in private.read()
