"""The root daemon trusts only what root controls.

End to end, with a real unprivileged account (tests/localattack.py) acting
as the attacker against the real daemon and the stand-in fakestap:
output directories it owns or swapped, symlinks to a root-only secret,
files that are not what they should be, script files and directories it can
write.  Each gets the documented refusal, the secret appears in no response
and no log line, planted code never runs, and a legitimate root-owned setup
keeps serving in the same tests.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import EXPORTER, FAKESTAP, ROOT, Exporter, stop_and_check, wait_for, write_script
from localattack import OpenWatch, Secret, attacker, shared  # noqa: F401 (fixtures)


@pytest.fixture
def start(dirs):
    """start(procfs, args=(), scripts=None) -> Exporter, stopped afterwards."""
    started = []

    def _start(procfs, args=(), scripts=None):
        exp = Exporter(scripts or dirs[0], procfs, args=args)
        started.append(exp)
        return exp
    yield _start
    for exp in started:
        stop_and_check(exp)


def module_path(exp, procfs, script):
    return os.path.join(str(procfs), exp.module_prefix + script[:-len(".stp")])


def wait_module(exp, procfs, script):
    path = module_path(exp, procfs, script)
    # The request only starts it: a short deadline ends its wait for output.
    r = exp.get("/" + script, headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.35"})
    assert r.status in (502, 503), r  # starting, or refused already
    wait_for(lambda: os.path.isdir(path), message="%s to be created" % path)
    return path


def refused_lines(exp, script):
    return [l for l in exp.log_lines if "event=refused" in l and "script=%s " % script in l]


def assert_refused_once(exp, script):
    for _ in range(3):
        assert exp.get("/" + script).status == 502
    exp.wait_log(r"event=refused script=%s " % re.escape(script))  # the log is read by a thread
    assert len(refused_lines(exp, script)) == 1, refused_lines(exp, script)


def assert_refusal_shown(exp, script):
    """The output refusal of SCRIPT shows in the self-metrics and on the
    index page; returns the index page."""
    metrics = exp.get("/metrics").text
    assert re.search(r'stap_exporter_scrape_errors_total\{reason="untrusted_output",'
                     r'script="%s"\} [1-9]' % re.escape(script), metrics), metrics
    index = exp.get("/").text
    assert re.search(r"%s .*refused to read" % re.escape(script), index), index
    return index


def planted(path, marker):
    """An executable script that would leave MARKER if it ever ran."""
    with open(path, "w") as f:
        f.write("#!/bin/sh\ntouch %s\nexec %s \"$0\" \"$@\"\n# fake: \n" % (marker, FAKESTAP))
    os.chmod(path, 0o755)
    return path


def test_output_planted_before_a_start_is_not_looked_at_while_it_compiles(dirs, start, attacker,
                                                                          shared, tmp_path):
    """What an attacker planted at the module's path is not the output of a
    start that is still compiling: requests meanwhile are told the script is
    starting, and the refusal comes once the loader runs, then holds."""
    scripts, _ = dirs
    secret = Secret(tmp_path)
    write_script(scripts, "slow.stp", "compile=1.5 never_write")
    entry = os.path.join(shared, "systemtap-root")
    attacker.run("mkdir", "-m", "0755", entry)
    exp = start(entry)
    target = os.path.join(entry, "target")
    attacker.sh("mkdir %s && ln -s %s %s/__prometheus && ln -s %s %s"
                % (target, secret.path, target, target, module_path(exp, entry, "slow.stp")))
    r = exp.get("/slow.stp")
    assert r.status == 503 and "is starting" in r.text, r.text
    exp.get_until("/slow.stp", 502)
    exp.wait_log(r"event=refused script=slow\.stp ")
    events = [l for l in exp.log_lines if re.search(r"event=(compiled|refused) script=slow\.stp ", l)]
    assert "event=compiled" in events[0], events  # refused only once the loader ran
    assert_refused_once(exp, "slow.stp")


def test_attacker_owned_output_directory(dirs, start, attacker, shared, tmp_path):
    """An unprivileged user creates the runtime's output
    directory first, then swaps module directories for their own."""
    scripts, good_procfs = dirs
    secret = Secret(tmp_path)
    write_script(scripts, "plain.stp")                             # root writes real output
    write_script(scripts, "victim.stp", "never_write")             # swapped for a symlink
    write_script(scripts, "fifo.stp", "mode=fifo never_write")     # FIFO swapped for a file
    write_script(scripts, "linked.stp", "never_write")             # module dir is a symlink
    entry = os.path.join(shared, "systemtap-root")
    attacker.run("mkdir", "-m", "0755", entry)
    exp = start(entry)
    exp.wait_log(r"event=untrusted procfs_dir=%s .*owned by uid %d .*remove the directory"
                 % (re.escape(entry), attacker.uid))
    reason = "%s is owned by uid %d" % (entry, attacker.uid)

    # Output root wrote, in a directory the attacker owns: refused.
    r = exp.get_until("/plain.stp", 502)
    assert "Untrusted script output: refused to read %s" % module_path(exp, entry, "plain.stp") \
        in r.text and reason in r.text, r.text

    # The module directory swapped for the attacker's own, with a link to the secret.
    victim = wait_module(exp, entry, "victim.stp")
    attacker.sh("mv %s %s.x && mkdir %s && ln -s %s %s/__prometheus"
                % (victim, victim, victim, secret.path, victim))
    r = exp.get_until("/victim.stp", 502)
    assert reason in r.text, r.text

    # A FIFO replaced by a regular file with the attacker's text.
    fifo = wait_module(exp, entry, "fifo.stp")
    attacker.sh("mv %s %s.x && mkdir %s && echo forged_metric 1 > %s/__prometheus"
                % (fifo, fifo, fifo, fifo))
    r = exp.get_until("/fifo.stp", 502)
    assert reason in r.text and "forged_metric" not in r.text, r.text

    # The module directory is a symlink to the attacker's directory: reading
    # is refused, and clean-up (stale at the start, and at the stop) removes
    # nothing through the link.
    target = os.path.join(entry, "target")
    attacker.sh("mkdir %s && ln -s %s %s/__prometheus && touch %s/keep && ln -s %s %s"
                % (target, secret.path, target, target, target,
                   module_path(exp, entry, "linked.stp")))
    r = exp.get_until("/linked.stp", 502)
    assert reason in r.text, r.text

    for script in ("plain.stp", "victim.stp", "fifo.stp", "linked.stp"):
        assert_refused_once(exp, script)
    index = assert_refusal_shown(exp, "victim.stp")
    exp.stop()
    assert os.path.exists(os.path.join(target, "keep")), "cleaned up through a link"
    secret.assert_not_in(exp.log_text(), r.text, index)
    assert re.search(r"event=cleanup msg=\"refused to remove %s is a symbolic link"
                     % re.escape(module_path(exp, entry, "linked.stp")), exp.log_text())

    # The same scripts in a root-owned setup serve as before.
    good = start(str(good_procfs))
    assert "fake_up" in good.get_until("/plain.stp").text
    assert not [l for l in good.log_lines if "event=untrusted" in l]


def test_untrusted_things_in_a_trusted_directory(dirs, start, attacker, tmp_path):
    """Below a trusted --procfs-dirs entry: a module directory the attacker
    owns, links, and a device are refused, and the device is never opened."""
    scripts, procfs = dirs
    secret = Secret(tmp_path)
    for name in ("owned.stp", "link.stp", "dev.stp", "moddirlink.stp"):
        write_script(scripts, name, "never_write")
    write_script(scripts, "ok.stp")
    write_script(scripts, "okfifo.stp", "mode=fifo")
    exp = start(str(procfs))
    assert "fake_up" in exp.get_until("/ok.stp").text
    assert "fake_up" in exp.get_until("/okfifo.stp").text

    owned = wait_module(exp, procfs, "owned.stp")
    # Say an admin's mistake gave it away (tmp_path is private to root, so
    # root plants the link the new owner could plant).
    os.chown(owned, attacker.uid, attacker.gid)
    os.symlink(secret.path, os.path.join(owned, "__prometheus"))
    os.lchown(os.path.join(owned, "__prometheus"), attacker.uid, attacker.gid)
    r = exp.get_until("/owned.stp", 502)
    assert "%s is owned by uid %d" % (owned, attacker.uid) in r.text, r.text

    link = wait_module(exp, procfs, "link.stp")
    os.symlink(secret.path, os.path.join(link, "__prometheus"))
    r = exp.get_until("/link.stp", 502)
    assert "%s/__prometheus is a symbolic link" % link in r.text, r.text

    dev = wait_module(exp, procfs, "dev.stp")
    node = os.path.join(dev, "__prometheus")
    os.mknod(node, 0o600 | 0o020000, os.makedev(1, 3))  # a character device (null)
    watch = OpenWatch(node)
    try:
        r = exp.get_until("/dev.stp", 502)
        assert "%s is a character device, not a regular file or FIFO" % node in r.text, r.text
        assert not watch.opened(), "the device was opened"
    finally:
        watch.close()

    moddir = wait_module(exp, procfs, "moddirlink.stp")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(secret.path, str(elsewhere / "__prometheus"))
    (elsewhere / "keep").write_text("not the exporter's to remove")
    os.rename(moddir, moddir + ".x")
    os.symlink(str(elsewhere), moddir)
    r = exp.get_until("/moddirlink.stp", 502)
    assert "%s is a symbolic link" % moddir in r.text, r.text

    assert exp.get("/ok.stp").status == 200  # the rest keeps serving
    exp.stop()
    # (The stand-in runtime itself unlinks MODULE/__prometheus by name when it
    # stops; the exporter's clean-up follows no link.)
    assert (elsewhere / "keep").exists(), "cleaned up through a link"
    assert re.search(r"event=cleanup msg=\"refused to remove %s is a symbolic link"
                     % re.escape(moddir), exp.log_text())
    secret.assert_not_in(exp.log_text())


def test_untrusted_script_files_are_refused_and_never_run(dirs, start, attacker, tmp_path):
    scripts, procfs = dirs
    marker = str(tmp_path / "planted-code-ran")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(str(outside), 0o755)
    owned = planted(str(scripts / "owned.stp"), marker)
    os.chown(owned, attacker.uid, attacker.gid)
    groupw = planted(str(scripts / "groupw.stp"), marker)
    os.chown(groupw, 0, attacker.gid)
    os.chmod(groupw, 0o775)
    target = planted(str(outside / "target.stp"), marker)
    os.chown(target, attacker.uid, attacker.gid)
    os.symlink(target, str(scripts / "link.stp"))
    write_script(scripts, "good.stp")
    write_script(scripts, "later.stp")
    exp = start(str(procfs), ["--follow-symlinks", "-k", "1"])

    index = exp.get("/").text  # marked before any request
    assert re.search(r"owned\.stp .*refused to run owned\.stp: %s is owned by uid %d"
                     % (re.escape(owned), attacker.uid), index), index
    cases = {"owned.stp": "%s is owned by uid %d" % (owned, attacker.uid),
             "groupw.stp": "%s is writable by group (mode 0775)" % groupw,
             "link.stp": "%s (reached through %s) is owned by uid %d"
                         % (target, scripts / "link.stp", attacker.uid)}
    for name, reason in cases.items():
        for _ in range(2):
            r = exp.get("/" + name)
            assert r.status == 403, r
            assert r.text.startswith("Untrusted script: refused to run %s: " % name), r.text
            assert reason in r.text, r.text
        exp.wait_log(r"event=refused script=%s " % re.escape(name))  # the log is read by a thread
        assert len(refused_lines(exp, name)) == 1, refused_lines(exp, name)
    assert re.search(r'reason="untrusted_script",script="owned.stp"\} 2',
                     exp.get("/metrics").text)
    assert exp.get_until("/good.stp").status == 200

    # Checked again before every start: a script that ran once, then was
    # made writable by others and had code appended, does not run again.
    assert exp.get_until("/later.stp").status == 200
    exp.wait_log(r"event=stopped script=later.stp", timeout=15)
    # Anyone may now rewrite it (root does it here: tmp_path is private).
    planted(str(scripts / "later.stp"), marker)
    os.chmod(str(scripts / "later.stp"), 0o757)
    r = exp.get("/later.stp")
    assert r.status == 403 and "writable by others (mode 0757)" in r.text, r
    assert not os.path.exists(marker), "planted code ran"


def _run_exporter(args, timeout=30):
    return subprocess.run([sys.executable, EXPORTER, "-p", "0", "--listen", "127.0.0.1",
                           "--stap", FAKESTAP] + args, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def test_scripts_directory_others_can_write_is_a_startup_error(attacker, shared, tmp_path):
    marker = str(tmp_path / "planted-code-ran")
    open_dir = os.path.join(shared, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o777)
    attacker.sh("cat > %s/autostart-x.stp <<'EOF'\n#!/bin/sh\ntouch %s\nEOF\nchmod 755 %s/*"
                % (open_dir, marker, open_dir))
    users_dir = os.path.join(shared, "users")
    attacker.run("mkdir", "-m", "0755", users_dir)
    cases = [(open_dir, "is writable by group and others (mode 0777)"),
             (users_dir, "is owned by uid %d" % attacker.uid)]
    for directory, reason in cases:
        for extra in ([], ["--check"]):
            proc = _run_exporter(["-s", directory] + extra)
            err = proc.stderr.decode()
            assert proc.returncode == 1, (proc.returncode, err)
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert err.startswith("stap-exporter: error: --scripts: refusing to run scripts"
                                  " from %s: %s %s" % (directory, directory, reason)), err
    assert not os.path.exists(marker), "planted code ran"


def test_insecure_scripts_is_the_documented_way_out(dirs, start, shared):
    _scripts, procfs = dirs
    loose = os.path.join(shared, "loose")
    os.mkdir(loose)
    os.chmod(loose, 0o777)
    write_script(loose, "s.stp")
    os.chmod(os.path.join(loose, "s.stp"), 0o666)
    exp = start(str(procfs), ["--insecure-scripts"], scripts=loose)
    assert exp.get_until("/s.stp").status == 200
    exp.wait_log(r"event=insecure msg=\"--insecure-scripts")


# Run in a monkey-patched process, as the daemon is: the trust walks' closes
# must take effect at once, not when the hub next runs (gevent >= 25.8.1
# defers os.close of anything but a regular file).
_WALK_FDS = r"""
from gevent import monkey
monkey.patch_all()
import os, sys
import gevent
from stapexporter_lib import trust

def walk(script, output_dir):
    before = len(os.listdir("/proc/self/fd"))
    assert trust.script_refusal(script) is None
    assert trust.dir_refusal(output_dir) is None
    root, module = os.path.split(output_dir)
    assert trust.output_refusal(root, module, "f") is None
    return len(os.listdir("/proc/self/fd")) - before

print(gevent.spawn(walk, sys.argv[1], sys.argv[2]).get())
"""


def test_trust_walks_close_their_descriptors_at_once_under_gevent(dirs):
    scripts, procfs = dirs
    script = write_script(scripts, "good.stp")
    output_dir = os.path.join(str(procfs), "mod")
    os.mkdir(output_dir, 0o755)
    with open(os.path.join(output_dir, "f"), "w"):
        pass
    done = subprocess.run([sys.executable, "-c", _WALK_FDS, str(script), output_dir], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "0"  # no descriptor left open by the walks
