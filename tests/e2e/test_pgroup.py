"""What is left of a script's process group after its leader is reaped is
signalled only where the exporter can prove a process is its own: unit tests
of pgroup.py on real processes, and an attack on a running exporter by a
local user who takes the group's freed id."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, pid_alive, wait_for
from localattack import attacker  # noqa: F401 (fixture)

sys.path.insert(0, ROOT)
from stapexporter_lib.scripts import pgroup, process as child  # noqa: E402

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def gone(pid):
    """PID no longer exists at all (reaped, not a zombie)."""
    return not os.path.exists("/proc/%d" % pid)


def state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def park(pid, user):
    """Start `sleep` as USER (an Attacker) leading a new session
    and process group with the freed pid PID: as root, set the pid counter
    just below it before each fork; a fork that missed is killed and retried."""
    for _ in range(200):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "60"], user=user.uid, group=user.gid, extra_groups=[],
                                start_new_session=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.fail("could not take pid %d: other processes kept forking" % pid)


# A new session and process group: a chain of DEPTH members below its
# leader, each the parent of the next and waiting for it; the last one
# writes its pid on stdout and sleeps.
GROUP = textwrap.dedent("""\
    import os, sys, time
    os.setsid()
    for _ in range(int(sys.argv[1])):
        if os.fork():
            os.wait()
            sys.exit(0)
    print(os.getpid(), flush=True)
    time.sleep(60)
    """)


@pytest.fixture
def subreaper():
    """The test process as a child subreaper (as the exporter is), for the
    test's duration."""
    assert child.set_child_subreaper()
    yield
    child._prctl(child.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def leaderless_group(depth):
    """(pgid, pid of the last member) of a GROUP whose leader was killed and
    reaped: its members went to the nearest subreaper."""
    leader = subprocess.Popen([sys.executable, "-c", GROUP, str(depth)], stdout=subprocess.PIPE)
    member = int(leader.stdout.readline())
    leader.stdout.close()
    pgid = leader.pid
    leader.kill()
    leader.wait()
    return pgid, member


@pytest.mark.parametrize("depth", [1, 3])
def test_members_below_us_are_signalled_after_the_leader_was_reaped(subreaper, depth):
    pgid, member = leaderless_group(depth)
    try:
        assert not pgroup.unreaped(pgid)
        assert os.getpgid(member) == pgid
        signalled, refused = pgroup.signal_members(pgid, 0)
        assert member in signalled and not refused
        assert len(signalled) == depth  # the members between count too
        assert pgroup.signal_members(pgid, signal.SIGKILL) == (signalled, [])
        wait_for(lambda: reaped(signalled), message="the members to die")
        assert pgroup.signal_members(pgid, 0) == ([], [])
    finally:
        kill_quietly(member)


def test_a_look_that_finds_nobody_is_taken_once_more(subreaper, monkeypatch):
    """/proc is listed before its entries are read: a look whose listing came
    before a member's child (its parent forked it and exited meanwhile) finds
    nobody.  Here the first listing names only a pid that has gone since."""
    pgid, member = leaderless_group(1)
    listings = [[5_000_001]]  # above any pid_max: never a live process
    real = pgroup.group_members
    monkeypatch.setattr(pgroup, "group_members",
                        lambda *args: listings.pop() if listings else real(*args))
    try:
        assert pgroup.signal_members(pgid, 0) == ([member], [])
        assert not listings
    finally:
        kill_quietly(member)
        reaped([member])


def reaped(pids):
    """Reap whichever of PIDS are our zombies (orphans come to the test as
    their subreaper); True once all are gone."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return all(gone(pid) for pid in pids)


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_member_not_below_us_is_refused_and_left_alone():
    """Without the test as subreaper, the members of a group whose leader
    exited move to a reaper above the test: they hold the group's id, but
    are not the test's."""
    pgid, member = leaderless_group(1)
    try:
        assert os.getpgid(member) == pgid
        signalled, refused = pgroup.signal_members(pgid, signal.SIGKILL)
        assert signalled == []
        assert [r.pid for r in refused] == [member]
        assert "is not a descendant of the exporter (pid %d)" % os.getpid() == refused[0].reason
        assert pid_alive(member)
    finally:
        kill_quietly(member)


def test_a_child_is_unreaped_until_it_is_waited_for():
    proc = subprocess.Popen(["true"])
    wait_for(lambda: state(proc.pid) == "Z", message="the child to be a zombie")
    assert pgroup.unreaped(proc.pid)  # a zombie still holds its pid
    proc.wait()
    assert not pgroup.unreaped(proc.pid)
    assert not pgroup.unreaped(1)  # not our child


def test_stat_fields_are_read_after_the_last_parenthesis(tmp_path):
    """A command name may hold anything but a NUL or a newline: ") 1 2 (" must
    not shift the fields.  (Fake pids above the kernel's largest: never real.)"""
    for pid, comm, pgrp in ((5_000_001, ") 1 2 (", 7), (5_000_002, "a b", 8)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text("%d (%s) S 42 %d %d 0 -1\n" % (pid, comm, pgrp,
                                                                                pgrp))
    (tmp_path / "self").mkdir()
    assert pgroup.read_stat(5_000_001, str(tmp_path)) == pgroup.Stat(") 1 2 (", 42, 7)
    assert pgroup.group_members(8, str(tmp_path)) == [5_000_002]
    # Members listed in a fake tree are never real processes: none is signalled.
    assert pgroup.signal_members(7, signal.SIGKILL, str(tmp_path)) == ([], [])


# An executable script that leaves a straggler behind: S, a member of its
# process group that notes SIGTERM and goes on, whose parent Q left the group
# and the session (setsid) after forking it, so that S's exit is reaped by Q,
# whatever the exporter is doing.  The pids are written as NAME.pid files.
WRAPPER = """#!{python}
import os, signal, time
here = {here!r}
def note(name, text=""):
    with open(here + "/." + name, "w") as f:
        f.write(text)
    os.rename(here + "/." + name, here + "/" + name)
note("leader.pid", str(os.getpid()))
if os.fork() == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    straggler = os.fork()
    if straggler == 0:
        signal.signal(signal.SIGTERM, lambda *a: note("termed"))
        note("straggler.pid", str(os.getpid()))
        while True:
            signal.pause()
    os.setsid()
    note("parent.pid", str(os.getpid()))
    os.waitpid(straggler, 0)
    os._exit(0)
time.sleep(3600)
"""


def test_a_freed_group_id_taken_by_another_user_is_not_signalled(dirs, exporter_factory,
                                                                 attacker, tmp_path):
    """Once the script's leader is reaped and its straggler is gone, a local
    user takes the group's freed id for a group of their own (parking the pid
    counter).  The exporter, still in the stop's grace (held up meanwhile, as
    a loaded machine may), must not signal that group."""
    scripts, _ = dirs
    here = tmp_path / "trap"
    here.mkdir()
    path = scripts / "trap.stp"
    path.write_text(WRAPPER.format(python=sys.executable, here=str(here)))
    path.chmod(0o755)
    exp = exporter_factory(["-k", "1", "--stop-timeout", "3", "--scrape-timeout", "1"])
    exp.get("/trap.stp")  # starts it; it never writes output

    def pid_file(name):
        return int((here / name).read_text()) if (here / name).exists() else None
    pgid = wait_for(lambda: pid_file("leader.pid"), message="the script")
    straggler = wait_for(lambda: pid_file("straggler.pid"), message="the straggler")
    wait_for(lambda: pid_file("parent.pid"), message="the straggler's parent to leave")
    # The idle stop: the leader is reaped, then the group is told to stop.
    wait_for(lambda: (here / "termed").exists(), timeout=10, message="the group's SIGTERM")
    assert gone(pgid)
    os.kill(exp.proc.pid, signal.SIGSTOP)
    intruder = None
    try:
        wait_for(lambda: state(exp.proc.pid) in "tT", message="the exporter to stop")
        os.kill(straggler, signal.SIGKILL)
        wait_for(lambda: gone(straggler), message="the straggler to be reaped")
        intruder = park(pgid, attacker)
        assert os.getpgid(intruder.pid) == pgid
    finally:
        os.kill(exp.proc.pid, signal.SIGCONT)
    try:
        exp.wait_log(r"event=stopped script=trap\.stp", timeout=10)
        assert intruder.poll() is None, "the exporter signalled another user's group"
        exp.wait_log(r'event=kill script=trap\.stp pid=%d pgid=%d msg="not signalled: sleep is'
                     r' not a descendant of the exporter' % (pgid, pgid))
    finally:
        intruder.kill()
        intruder.wait()
