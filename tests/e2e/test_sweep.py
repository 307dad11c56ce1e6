"""The start-up sweep survives anything, kills nothing that is not provably
ours, never signals a reused pid, stays quick whatever other users plant, and
clean-up neither opens devices nor dies on deep trees.

The sweep looks at every process on the host, and other exporters (other
test runs) sweep at the same time.  So each sweep scenario runs the daemon
as pid 1 of a fresh pid namespace with its own /proc (``NsExporter``), with
the planted processes inside it, and names as the "dead exporter" the pid of
this pytest process (or of a sleeper, if the host's pids wrapped round):
dead inside the namespace, alive (so left alone by everyone else) outside.
Directories are planted in a private sticky TMPDIR.  The attacker is a real
unprivileged account (tests/localattack.py).
"""

import atexit
import os
import re
import signal
import subprocess
import time
import uuid
from unittest import mock

import pytest

from conftest import (FAKESTAP, Exporter, pid_alive, processes_matching, stop_and_check,
                      wait_for, write_script)
from localattack import OpenWatch, Secret, attacker, shared  # noqa: F401 (fixtures)
from stapexporter_lib.scripts import leftovers



def _alive_high_pid():
    """A pid alive outside the test's pid namespaces and out of their reach
    (above 1000): this pytest process's or, once the host's pid counter has
    wrapped round, that of a sleeper kept while the tests run."""
    if os.getpid() > 1000:
        return os.getpid()
    while True:
        holder = subprocess.Popen(["sleep", "3600"])
        if holder.pid > 1000:
            atexit.register(holder.kill)
            return holder.pid
        holder.kill()
        holder.wait()


DEAD = _alive_high_pid()  # the "dead exporter" (see the module docstring)
DEPTH = 1500        # deeper than Python's recursion limit


@pytest.fixture
def dirs(dirs):
    """conftest's dirs, emptied with rm -rf afterwards: pytest's own clean-up
    of old temporary directories recurses and fails on deep trees that a
    failed test may leave."""
    yield dirs
    for d in dirs:
        subprocess.run(["rm", "-rf", str(d)])


@pytest.fixture
def tmpdir_shared(shared):
    return shared


class NsExporter(Exporter):
    """conftest's Exporter run as pid 1 of a new pid namespace (with its own
    /proc) after the shell commands PLANT ran there."""

    def __init__(self, *args, plant="", **kw):
        real = subprocess.Popen

        def popen(cmd, *a, **k):
            wrapped = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                       "sh", "-c", plant + '\nexec "$@"', "sh"] + list(cmd)
            return real(wrapped, *a, **k)
        assert DEAD > 1000, "the pytest pid could exist inside the namespace"
        with mock.patch.object(subprocess, "Popen", popen):
            super().__init__(*args, **kw)

    def stop(self, timeout=20.0):
        # unshare ignores SIGTERM while it waits: signal the daemon itself.
        # Everything left in the namespace dies with its pid 1.
        try:
            with open("/proc/%d/task/%d/children" % ((self.proc.pid,) * 2)) as f:
                os.kill(int(f.read().split()[0]), signal.SIGTERM)
        except (OSError, IndexError, ValueError):
            pass
        return super().stop(timeout)


def as_user(attacker):
    """Shell words that exec a command as ATTACKER (no root parent left
    running with the command's arguments, as runuser would leave)."""
    return "setpriv --reuid=%d --regid=%d --clear-groups" % (attacker.uid, attacker.gid)


def sleeper(token, *args, ignore_term=False):
    """A shell word list for a python sleep whose command line holds TOKEN."""
    code = "import signal,time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "time.sleep(120)"
    return "python3 -c '%s' %s %s" % (code, token, " ".join(args))


def deep_tree(top, depth, files=True):
    """TOP with DEPTH nested directories (each with a file) below it."""
    os.mkdir(top, 0o700)
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            if files:
                os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def live(token):
    """Live python sleepers holding TOKEN (not the shells that started them)."""
    return [p for p in processes_matching(token) if cmdline(p).startswith("python3 -c")]


def wait_started(token):
    """Shell: wait until a process with TOKEN runs (a pattern grep itself
    does not match)."""
    return "while ! grep -qs '%s[%s]' /proc/[0-9]*/cmdline; do sleep 0.01; done" % (
        token[:-1], token[-1])


def test_sweep_survives_huge_numbers_odd_names_and_deep_trees(dirs, attacker,
                                                              tmpdir_shared):
    scripts, procfs = dirs
    tmp = tmpdir_shared
    tok = "tok%s" % uuid.uuid4().hex[:12]
    write_script(scripts, "ok.stp")
    huge = os.path.join(tmp, "stap-exporter.99999999999999999999.x")
    attacker.run("mkdir", huge)
    attacker.run("python3", "-c", "import os,sys\nos.chdir(sys.argv[1])\nos.mkdir(sys.argv[2])\n"
                 "os.chdir(sys.argv[2])\nfor i in range(%d):\n os.mkdir('d'); os.chdir('d')"
                 % DEPTH, tmp, "stap-exporter.%d.deep" % DEAD)
    users_deep = os.path.join(tmp, "stap-exporter.%d.deep" % DEAD)
    root_deep = os.path.join(tmp, "stap-exporter.%d.rootdeep" % DEAD)
    deep_tree(root_deep, DEPTH)
    odd = ["stap-exporter.0.x", "stap-exporter..x", "stap-exporter.\u0663\u0664.x"]
    for name in odd:
        os.mkdir(os.path.join(tmp, name), 0o700)
    undecodable = os.path.join(tmp, "stap-exporter.%d.bad\udcff" % DEAD).encode(
        "utf-8", "surrogateescape")
    os.mkdir(undecodable, 0o700)
    fifo = os.path.join(tmp, "stap-exporter.%d.fifo" % DEAD)
    os.mkfifo(fifo, 0o600)
    link = os.path.join(tmp, "stap-exporter.%d.link" % DEAD)
    os.symlink("/etc", link)
    os.mkdir(str(procfs / "stapexp_99999999999999999999_x"))
    deep_tree(str(procfs / ("stapexp_%d_gone" % DEAD)), DEPTH, files=False)
    plant = "\n".join([
        "%s %s &" % (as_user(attacker), sleeper(tok + "user",
                                                          "-m stapexp_4294967296_x")),
        "%s &" % sleeper(tok + "root", "-m stapexp_99999999999999999999_x"),
        "%s &" % sleeper(tok + "zero", "-m stapexp_0_x"),
        wait_started(tok + "user"),
    ])
    exp = NsExporter(scripts, procfs, plant=plant, env={"TMPDIR": tmp})
    try:
        assert exp.get_until("/ok.stp").status == 200
        for suffix in ("user", "root", "zero"):
            assert live(tok + suffix), "%s was killed" % suffix
        assert os.path.isdir(huge) and os.path.isdir(users_deep)
        assert not os.path.exists(root_deep), "the root-owned deep tree was not removed"
        assert not os.path.exists(str(procfs / ("stapexp_%d_gone" % DEAD)))
        assert os.path.isdir(str(procfs / "stapexp_99999999999999999999_x"))
        for name in odd:
            assert os.path.isdir(os.path.join(tmp, name))
        assert not os.path.exists(undecodable)
        assert os.path.islink(link) and os.path.exists(fifo)
        text = exp.log_text()
        assert "Traceback" not in text and "OverflowError" not in text, text
        assert re.search(r"event=leftovers msg=\"leaving %s alone: is owned by uid %d"
                         % (re.escape(users_deep), attacker.uid), text), text
        assert re.search(r"event=leftovers msg=\"leaving %s alone: is a symbolic link"
                         % re.escape(link), text), text
        assert re.search(r"event=leftovers msg=\"removed %s" % re.escape(root_deep), text), text
    finally:
        exp.stop()


def test_sweep_kills_only_what_is_ours(dirs, attacker, tmpdir_shared):
    scripts, procfs = dirs
    tmp = tmpdir_shared
    tok = "tok%s" % uuid.uuid4().hex[:12]
    write_script(scripts, "ok.stp")
    users_dir = os.path.join(tmp, "users-dir")
    attacker.run("mkdir", users_dir)
    renamed = os.path.join(tmp, "stap-exporter.%d.x" % DEAD)
    ours = [os.path.join(tmp, "stap-exporter.%d.ours%d" % (DEAD, i)) for i in (1, 2)]
    for d in ours:
        os.mkdir(d, 0o700)
    plant = "\n".join([
        # A root process working in a directory the attacker owns, which the
        # attacker then renames to look like a dead exporter's.
        "(cd %s && exec %s) &" % (users_dir, sleeper(tok + "rootcwd")),
        wait_started(tok + "rootcwd"),
        "runuser -u %s -- mv %s %s" % (attacker.name, users_dir, renamed),
        # The attacker's own process named like one of ours.
        "%s %s &" % (as_user(attacker), sleeper(tok + "user", "-m stapexp_%d_x" % DEAD)),
        # Root processes that merely carry a dead exporter's module name: one
        # of root's, and runuser holding the attacker's words.
        "%s &" % sleeper(tok + "rootargs", "-m stapexp_%d_x" % DEAD),
        "runuser -u %s -- sh -c 'sleep 120; : %s' -m stapexp_%d_job &"
        % (attacker.name, tok + "runuser", DEAD),
        # Real leftovers of the dead exporter, in its private working directories.
        "(cd %s && exec %s) &" % (ours[0], sleeper(tok + "module", "-m stapexp_%d_x" % DEAD)),
        "(cd %s && exec %s) &" % (ours[1], sleeper(tok + "workdir", ignore_term=True)),
        wait_started(tok + "user"),
        wait_started(tok + "runuser"),
    ])
    exp = NsExporter(scripts, procfs, plant=plant, env={"TMPDIR": tmp})
    try:
        assert exp.get_until("/ok.stp").status == 200
        wait_for(lambda: not live(tok + "module") and not live(tok + "workdir"),
                 message="the real leftovers to be stopped")
        assert live(tok + "rootcwd") and live(tok + "user") and live(tok + "rootargs")
        assert [p for p in processes_matching(tok + "runuser")
                if cmdline(p).startswith("runuser")], "the root runuser was killed"
        assert os.path.isdir(renamed) and not any(os.path.exists(d) for d in ours)
        text = exp.log_text()
        assert re.search(r"event=leftovers msg=\"stopping 2 processes of a dead exporter", text), text
        assert re.search(r"event=leftovers msg=\"leaving %s alone: not a private directory of ours"
                         r" \(uid %d" % (re.escape(renamed), attacker.uid), text), text
    finally:
        exp.stop()


def test_sweep_never_signals_a_reused_pid(dirs, tmpdir_shared):
    scripts, procfs = dirs
    tmp = tmpdir_shared
    tok = "tok%s" % uuid.uuid4().hex[:12]
    write_script(scripts, "ok.stp")
    recycled = "61.%d" % (uuid.uuid4().int % 10 ** 6)
    ours = [os.path.join(tmp, "stap-exporter.%d.%s" % (DEAD, n)) for n in "ab"]
    for d in ours:
        os.mkdir(d, 0o700)
    plant = "\n".join([
        "(cd %s && exec %s) &" % (ours[0], sleeper(tok + "a", ignore_term=True)),
        "(cd %s && exec %s) &" % (ours[1], sleeper(tok + "b")),
        "B=$!",
        "echo $B > %s/b" % tmp,
        # Once b has exited (on the sweep's SIGTERM) and been reaped, hand its
        # pid to an unrelated root process, during the sweep's grace period.
        "(while [ -d /proc/$B ]; do sleep 0.01; done",
        " echo $((B - 1)) > /proc/sys/kernel/ns_last_pid",
        " sleep %s & echo $! > %s/recycled; wait) &" % (recycled, tmp),
        wait_started(tok + "b"),
    ])
    exp = NsExporter(scripts, procfs, plant=plant, env={"TMPDIR": tmp})
    try:
        assert exp.get_until("/ok.stp").status == 200
        wait_for(lambda: not live(tok + "a") and not live(tok + "b"),
                 message="the leftovers to be gone")
        with open(os.path.join(tmp, "b")) as f, open(os.path.join(tmp, "recycled")) as g:
            assert f.read() == g.read(), "the pid was not reused: the attack did not happen"
        assert [p for p in processes_matching(recycled) if cmdline(p) == "sleep " + recycled], \
            "the process that got the reused pid was killed"
        assert re.search(r"event=leftovers msg=\"stopping 2 processes", exp.log_text())
    finally:
        exp.stop()


# A pid no process can have (above pid_max), not one an exporter could use.
NO_SUCH_PID = 4000000

# Run as the attacker: start COUNT sleepers whose command lines hold SIZE
# bytes of "-m stapexp_<PID>_..." pairs; print their pids.
PLANT_HUGE_ARGV = r"""
import os, resource, sys
count, size, token, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
resource.setrlimit(resource.RLIMIT_STACK, (64 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))
pair = ["-m", "stapexp_%s_%s" % (pid, "x" * 10)]
words = pair * (size // len("".join(pair) + "  "))
quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
for _ in range(count):
    print(os.posix_spawn("/usr/bin/python3", ["python3", "-c", "import time; time.sleep(120)",
                                              token] + words, {}, file_actions=quiet))
"""

# Run as the attacker: COUNT names of an empty file, named like a dead
# exporter's working directories, in the directory DIR (hard links: making
# as many files takes ten times as long, and the sweep sees the same).
PLANT_FILES = r"""
import os, sys
directory, count, dead = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(directory, os.O_RDONLY)
first = "stap-exporter.%s.0" % dead
os.close(os.open(first, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
for i in range(1, count):
    os.link(first, "stap-exporter.%s.%d" % (dead, i), src_dir_fd=fd, dst_dir_fd=fd)
"""


def launch_to_serve(*args, **kw):
    """(an Exporter(*ARGS, **KW) that has answered HTTP, seconds from its
    launch to that answer)."""
    launched = time.monotonic()
    exp = Exporter(*args, **kw)
    try:
        assert exp.get("/").status == 200
    except BaseException:
        exp.stop()
        raise
    return exp, time.monotonic() - launched


def start_up_bound(*args, **kw):
    """How long start-up may take with other users' plants in place: 2 s,
    or four times a start-up without them measured now when the machine is
    loaded (a sweep that reads what others planted takes many times that)."""
    exp, took = launch_to_serve(*args, **kw)
    exp.stop()
    return max(2.0, 4 * took)


def serves_within(seconds, *args, **kw):
    """An Exporter(*ARGS, **KW) that answered HTTP within SECONDS of its
    launch, in one of three launches: a moment's load on the machine can
    slow one, a sweep that reads what others planted slows every one."""
    took = []
    for _ in range(3):
        exp, seconds_taken = launch_to_serve(*args, **kw)
        if seconds_taken < seconds:
            return exp
        exp.stop()
        took.append(round(seconds_taken, 1))
    raise AssertionError("the exporter served %s s after its launch" % took)


def leftovers_lines(exp):
    return [line for line in exp.log_lines if "event=leftovers" in line]


def test_other_users_huge_command_lines_do_not_delay_start_up(dirs, attacker):
    scripts, procfs = dirs
    bound = start_up_bound(scripts, procfs)
    tok = "tok%s" % uuid.uuid4().hex[:12]
    # Module names of a live process (this one) cost most to look into.
    planted = attacker.run("python3", "-c", PLANT_HUGE_ARGV, "3", str(2 << 20), tok,
                           str(os.getpid())).stdout.split()
    pids = [int(p) for p in planted]
    exp = None
    try:
        wait_for(lambda: all(len(cmdline(p)) > 1 << 20 for p in pids),
                 message="the planted command lines")
        exp = serves_within(bound, scripts, procfs)
        assert all(pid_alive(p) for p in pids)
        assert not leftovers_lines(exp), leftovers_lines(exp)
    finally:
        for p in pids:
            os.kill(p, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in pids), message="the sleepers to go")
        if exp is not None:
            exp.stop()


def test_other_users_look_alike_files_do_not_delay_start_up(dirs, attacker, tmpdir_shared):
    scripts, procfs = dirs
    count = leftovers.MAX_ENTRIES + 10_000     # more than one sweep looks at
    bound = start_up_bound(scripts, procfs, env={"TMPDIR": tmpdir_shared})
    attacker.run("python3", "-c", PLANT_FILES, tmpdir_shared, str(count), str(NO_SUCH_PID))
    exp = serves_within(bound, scripts, procfs, env={"TMPDIR": tmpdir_shared})
    try:
        lines = leftovers_lines(exp)
        assert len(lines) <= 13, "\n".join(lines)
        assert re.search(r"event=leftovers msg=\"leaving %s\d+ alone: is owned by uid %d"
                         % (re.escape(os.path.join(tmpdir_shared, "stap-exporter.%d."
                                                   % NO_SUCH_PID)), attacker.uid), lines[0])
        assert re.search(r"event=leftovers msg=\"left \d+ more look-alikes alone", lines[-1])
        assert any("looked at the first %d entries of %s only" % (leftovers.MAX_ENTRIES,
                                                                   tmpdir_shared) in line
                   for line in lines), lines
        assert len(os.listdir(tmpdir_shared)) >= count
    finally:
        exp.stop()


def test_cleanup_survives_deep_trees(dirs):
    """Module directories and working directories nested deeper than
    Python's recursion limit are removed without ending a watchdog."""
    scripts, procfs = dirs
    write_script(scripts, "deep.stp")
    write_script(scripts, "stale.stp")
    wrapper = scripts / "nests.stp"
    wrapper.write_text("#!/bin/sh\npython3 -c 'import os\nfor i in range(%d):\n"
                       " os.mkdir(\"d\"); os.chdir(\"d\")'\nexec %s \"$0\" \"$@\"\n# fake: \n"
                       % (DEPTH, FAKESTAP))
    os.chmod(str(wrapper), 0o755)
    exp = Exporter(scripts, procfs, args=["-k", "2"])
    try:
        moddir = str(procfs / (exp.module_prefix + "deep"))
        built = str(procfs / "built-elsewhere")
        deep_tree(built, DEPTH)
        assert exp.get_until("/deep.stp").status == 200
        os.rename(built, os.path.join(moddir, "nested"))  # at once, before the keepalive stop
        # The others meanwhile: the keepalive stops of deep.stp and nests.stp overlap.
        assert exp.get_until("/nests.stp").status == 200
        deep_tree(str(procfs / (exp.module_prefix + "stale")), DEPTH)
        assert exp.get_until("/stale.stp").status == 200
        exp.wait_log(r"event=stale script=stale.stp msg=\"removed")
        exp.wait_log(r"event=stopped script=deep.stp", timeout=20)
        assert not os.path.exists(moddir)
        exp.wait_log(r"event=stopped script=nests.stp", timeout=20)
        assert not [d for d in os.listdir(os.environ.get("TMPDIR", "/tmp"))
                    if d.startswith("stap-exporter.%d.%snests" % (exp.proc.pid,
                                                                 exp.module_prefix))]
        assert exp.get_until("/deep.stp").status == 200  # the watchdog lives on
        assert "watchdog-crashed" not in exp.log_text()
        assert "RecursionError" not in exp.log_text()
    finally:
        stop_and_check(exp)


def test_link_to_a_device_is_never_opened(dirs, attacker, tmpdir_shared, tmp_path):
    """A __prometheus link to a device (a watchdog, say) is refused before
    anything opens it, by the read and by the clean-up."""
    scripts, _ = dirs
    secret = Secret(tmp_path)
    devdir = os.path.join(tmpdir_shared, "dev")
    os.mkdir(devdir, 0o755)
    device = os.path.join(devdir, "watchdog")
    os.mknod(device, 0o600 | 0o020000, os.makedev(1, 3))
    entry = os.path.join(tmpdir_shared, "systemtap-root")
    attacker.run("mkdir", entry)
    write_script(scripts, "victim.stp", "never_write")
    exp = Exporter(scripts, entry)
    watch = OpenWatch(device)
    try:
        r = exp.get("/victim.stp")
        victim = os.path.join(entry, exp.module_prefix + "victim")
        wait_for(lambda: os.path.isdir(victim), message="the module directory")
        attacker.sh("mv %s %s.x && mkdir %s && ln -s %s %s/__prometheus"
                    % (victim, victim, victim, device, victim))
        r = exp.get_until("/victim.stp", 502)
        assert "is owned by uid %d" % attacker.uid in r.text, r.text
        assert not watch.opened(), "the device was opened"
        stop_and_check(exp)
        assert not watch.opened(), "the clean-up opened the device"
        assert os.path.exists(device)
        secret.assert_not_in(exp.log_text())
    finally:
        watch.close()
        stop_and_check(exp)
