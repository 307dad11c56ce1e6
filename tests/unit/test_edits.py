"""Live scripts in-process, on the virtual clock of test_session.py: an
edited file's new version starts beside the running one and takes over once
its output appears, a broken edit leaves the running version serving, stops
and idleness end both runs; the file's own settings; the names the versions
run under.  No real time passes between events and no real process is
started or signalled (the fake pids lie above the kernel's largest)."""

import math
import os
import re
import signal
import sys

import gevent
import gevent.event
import pytest

from conftest import ROOT
from test_session import SETTLE, settle, spawned, world  # noqa: F401 (fixture)

sys.path.insert(0, ROOT)
from stapexporter_lib.scripts import leftovers, naming, output  # noqa: E402
from stapexporter_lib.scripts.catalog import Catalog, Script  # noqa: E402
from stapexporter_lib.scripts.session import (Outcome, Session, SessionConfig,  # noqa: E402
                                              StartSlots, file_identity)
from stapexporter_lib.scripts.settings import KEYS, Settings, SettingsError, parse  # noqa: E402

BODY = "probe begin {}\n"


def write_output(procfs_dir, module, text):
    module_dir = procfs_dir / module
    module_dir.mkdir(exist_ok=True)
    (module_dir / "__prometheus").write_bytes(text)


def edit(session, text):
    """Replace the script file (renamed into place) and tell the session what
    the manager's look at the files would tell it."""
    tmp = session.script.path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, session.script.path)
    assert session.file_changed(file_identity(os.stat(session.script.path)))


def running(world, name="a.stp", **kw):
    """A session whose first version runs and serves b"old 1\\n"; (session,
    its process)."""
    make, vt, fake, procfs_dir = world
    s = make(name, **kw)
    s.start()
    proc = spawned(fake, len(fake.procs) + 1)
    write_output(procfs_dir, s.module, b"old 1\n")
    vt.advance(0.01)
    settle(lambda: s.state == "running", "running")
    return s, proc


def candidate(world, s):
    """Edit S's file; the new version's process, once spawned."""
    fake = world[2]
    count = len(fake.procs)
    edit(s, "# version %d\n%s" % (count, BODY))  # a content of its own
    proc = spawned(fake, count + 1)
    assert proc.argv[:3] == ["/nonexistent/stap", "-m", naming.version_module(
        s.script.module, s.version + 1)]
    return proc


def test_an_edit_takes_over_once_its_output_appears_and_the_old_run_stops(world):
    make, vt, fake, procfs_dir = world
    s, old = running(world)
    new = candidate(world, s)
    # Until the new version's output appears, the old one answers.
    for _ in range(3):
        vt.advance(0.1)
        outcome = s.scrape(5)
        assert (outcome.kind, outcome.body) == (Outcome.OK, b"old 1\n")
    assert s.state == "running" and s.pid == old.pid and not fake.signals
    write_output(procfs_dir, naming.version_module(s.script.module, 1), b"new 1\n")
    vt.advance(0.2)
    settle(lambda: s.pid == new.pid, "the new version to take over")
    settle(lambda: s.exits["stopped"] == 1, "the old run to stop")
    assert fake.leader_signals == [(old.pid, signal.SIGTERM)]  # as any stop: probe end runs
    assert s.scrape(5).body == b"new 1\n" and s.state == "running"
    assert (s.version, s.starts, s.exits["stopped"], s.edit_failures) == (1, 2, 1, 0)
    assert not (procfs_dir / s.script.module).exists()  # the old run's output went with it
    # The next edit runs under the first name again, beside the second.
    newer = candidate(world, s)
    assert newer.argv[2] == s.script.module


@pytest.mark.parametrize("read_ends", ["with data", "with an error"])
def test_the_old_version_stops_only_once_the_read_under_way_is_done(world, read_ends):
    """A read of the old version's output under way as the new one takes
    over is answered: the old version is stopped once it is done; a read
    that fails as the old version goes is made again from the new one."""
    make, vt, fake, procfs_dir = world
    s, old = running(world)
    gate = gevent.event.AsyncResult()
    s._run.reader._read = lambda path, timeout, max_bytes, clock: gate.get()
    scrape = gevent.spawn(s.scrape, 5)
    settle(lambda: s._run.reader.in_flight is not None, "the read under way")
    new = candidate(world, s)
    write_output(procfs_dir, naming.version_module(s.script.module, 1), b"new 1\n")
    vt.advance(0.2)
    settle(lambda: s.pid == new.pid, "the new version to take over")
    gevent.sleep(0.05)
    assert old.returncode is None and not fake.signals  # the read is not cut short
    if read_ends == "with data":
        gate.set(b"old 1\n")
        assert scrape.get(timeout=SETTLE).body == b"old 1\n"
    else:
        gate.set_exception(output.OutputError("the script exited while writing its output"))
        assert scrape.get(timeout=SETTLE).body == b"new 1\n"
    settle(lambda: s.exits["stopped"] == 1, "the old version to stop")
    assert fake.leader_signals == [(old.pid, signal.SIGTERM)]


def test_an_edits_settings_apply_once_it_takes_over(world):
    make, vt, fake, procfs_dir = world
    s, old = running(world)
    count = len(fake.procs)
    edit(s, "# stap-exporter: scrape-timeout=7\n" + BODY)
    new = spawned(fake, count + 1)
    assert s.settings.scrape_timeout is None  # the running version's
    new.exit(1)
    settle(lambda: s.edit_failures == 1, "the failed edit")
    assert s.settings.scrape_timeout is None
    edit(s, "# stap-exporter: scrape-timeout=8\n" + BODY)
    spawned(fake, count + 2)
    write_output(procfs_dir, naming.version_module(s.script.module, 1), b"new 1\n")
    vt.advance(0.2)
    settle(lambda: s.version == 1, "the take-over")
    assert s.settings.scrape_timeout == 8


def test_a_touched_file_with_the_same_content_starts_nothing(world):
    fake = world[2]
    s, _ = running(world)
    with open(s.script.path) as f:
        text = f.read()
    edit(s, text)
    gevent.sleep(0.05)
    settle(lambda: not s._edited, "the edit to be looked at")
    assert len(fake.procs) == 1 and s.version == 0


def test_a_broken_edit_keeps_the_old_version_serving_until_fixed(world):
    make, vt, fake, procfs_dir = world
    s, old = running(world)
    new = candidate(world, s)
    new.say("semantic error: no such probe")
    new.exit(1)
    settle(lambda: s.edit_failures == 1, "the failed edit")
    assert "the new version failed (exit status 1)" in s.edit_error
    assert s.edit_stderr == ["semantic error: no such probe"]
    assert s.state == "running" and s.pid == old.pid
    assert old.pid not in [pid for pid, _ in fake.signals]
    assert s.scrape(5).body == b"old 1\n"
    # Looked at again unchanged, it is not tried again...
    assert not s.file_changed(file_identity(os.stat(s.script.path)))
    gevent.sleep(0.05)
    assert len(fake.procs) == 2
    # ...a fix is, and takes over.
    fixed = candidate(world, s)
    write_output(procfs_dir, naming.version_module(s.script.module, 1), b"fixed 1\n")
    vt.advance(0.2)
    settle(lambda: s.pid == fixed.pid, "the fixed version to take over")
    assert s.edit_error is None and s.scrape(5).body == b"fixed 1\n"


def test_an_edit_with_a_wrong_setting_is_not_tried(world):
    fake = world[2]
    s, old = running(world)
    edit(s, "# stap-exporter: keepalive=soon\n" + BODY)
    settle(lambda: s.edit_failures == 1, "the refused edit")
    assert "setting keepalive=soon" in s.edit_error
    assert len(fake.procs) == 1 and s.pid == old.pid


@pytest.mark.parametrize("how", ["stop", "idle"])
def test_a_stop_or_idleness_during_an_edit_ends_both_runs(world, how):
    make, vt, fake, _ = world
    s, old = running(world, keepalive=10)
    new = candidate(world, s)
    if how == "stop":
        stopper = gevent.spawn(s.stop)
        settle(lambda: stopper.ready(), "the stop")
    else:
        vt.advance(10)
    settle(lambda: s.state == "stopped" and not s.live, "stopped")
    assert old.returncode == new.returncode == -signal.SIGTERM
    assert s.pid is None and s.version == 0


def test_the_running_version_exiting_during_an_edit_ends_the_new_one(world):
    make, vt, fake, _ = world
    s, old = running(world)
    new = candidate(world, s)
    old.exit(1)
    settle(lambda: s.state == "failed" and not s.live, "failed")
    assert new.returncode == -signal.SIGTERM and s.version == 0


def test_an_edits_start_counts_under_max_starting(world, tmp_path):
    """The new version holds a --max-starting slot until its output appears:
    another script's start waits for it."""
    _, vt, fake, procfs_dir = world
    slots = StartSlots(1)
    config = SessionConfig(stap=["/nonexistent/stap"], procfs_dirs=[str(procfs_dir)],
                           keepalive=None, start_wait=1.0, stop_grace=5.0,
                           workdir_root=str(tmp_path), max_output=output.DEFAULT_MAX_BYTES,
                           plan=None, cache=None, insecure_scripts=False,
                           max_series=None)
    a, b = [Session(Script(name, str(tmp_path / name), "stapexp_1_" + name[0]), config,
                    clock=vt.clock, popen=fake.popen, wait=vt.wait, killpg=fake.killpg,
                    kill=fake.kill, start_slots=slots) for name in ("a.stp", "b.stp")]
    for s in (a, b):
        with open(s.script.path, "w") as f:
            f.write(BODY)
    try:
        a.start()
        spawned(fake, 1)
        write_output(procfs_dir, a.module, b"a 1\n")
        vt.advance(0.01)
        settle(lambda: a.state == "running" and slots.taken == 0, "a running, its slot free")
        new = candidate(world, a)
        assert slots.taken == 1
        b.start()
        settle(lambda: b.queued, "b to be queued")
        assert len(fake.procs) == 2
        write_output(procfs_dir, naming.version_module(a.script.module, 1), b"a 2\n")
        vt.advance(0.2)
        settle(lambda: a.pid == new.pid, "the edit to take over")
        assert "stapexp_1_b" in spawned(fake, 3).argv
    finally:
        for s in (a, b):
            gevent.spawn(s.stop, SETTLE)
        settle(lambda: not a.live and not b.live, "both stopped")


# -- the file's own settings ----------------------------------------------------


def test_settings_are_read_from_the_comment_lines():
    text = (b"#!/bin/sh\n# stap-exporter: keepalive=600 autostart=yes\n"
            b"probe begin {}\n  #stap-exporter:  scrape-timeout=2.5\tmax-series=100\n")
    assert parse(text) == Settings(keepalive=600.0, autostart=True, scrape_timeout=2.5,
                                   max_series=100)
    assert parse(b"# stap-exporter: keepalive=never autostart=no\n") == \
        Settings(keepalive=math.inf, autostart=False)
    assert parse(b"probe begin {}\n// stap-exporter: keepalive=soon\n") == Settings()


@pytest.mark.parametrize("line,key", [
    ("keepalive=soon", "keepalive=soon"), ("keepalive=0", "keepalive=0"),
    ("keepalive=inf", "keepalive=inf"), ("autostart=maybe", "autostart=maybe"),
    ("scrape-timeout=-1", "scrape-timeout=-1"), ("scrape-timeout=nan", "scrape-timeout=nan"),
    ("max-series=0", "max-series=0"), ("max-series=1.5", "max-series=1.5"),
    ("max-series=\u0661", "max-series="), ("keepalive", "setting keepalive has no value"),
    ("keepalive=1 keepalive=2", "setting keepalive is given twice"),
    ("keep-alive=1", "unknown setting keep-alive"),
])
def test_a_wrong_setting_is_one_line_naming_the_key(line, key):
    with pytest.raises(SettingsError) as raised:
        parse(("# stap-exporter: %s\n" % line).encode())
    message = str(raised.value)
    assert key in message and "\n" not in message


def test_a_hostile_value_is_escaped_and_cut():
    with pytest.raises(SettingsError) as raised:
        parse(b"# stap-exporter: autostart=\x1b]0;x\x07" + b"y" * 500 + b"\n")
    assert "\x1b" not in str(raised.value) and len(str(raised.value)) < 150


def test_a_wrong_setting_refuses_the_script_until_fixed(world):
    make, vt, fake, _ = world
    s = make()
    with open(s.script.path, "w") as f:
        f.write("# stap-exporter: keepalive=soon\n" + BODY)
    outcome = s.scrape(5)
    assert outcome.kind == Outcome.BAD_SETTINGS and "setting keepalive=soon" in outcome.message
    assert s.state == "refused" and not s.live and not fake.procs
    assert s.scrape(5).kind == Outcome.BAD_SETTINGS and not fake.procs
    with open(s.script.path, "w") as f:
        f.write("# stap-exporter: keepalive=5\n" + BODY)
    identity = file_identity(os.stat(s.script.path))
    assert s.file_changed(identity)
    s.read_settings(identity)
    assert s.state == "stopped" and s.last_error is None and s.keepalive == 5
    scrape = gevent.spawn(s.scrape, 5)  # starts it; answers when the start wait is over
    spawned(fake, 1)
    vt.advance(1)
    assert scrape.get(timeout=SETTLE).kind == Outcome.NOT_READY


@pytest.mark.parametrize("header,cli,stops_after", [
    ("keepalive=1", None, 1), ("keepalive=never", 1, None), ("", 3, 3),
])
def test_the_keepalive_setting_overrides_the_command_line(world, header, cli, stops_after):
    make, vt, fake, procfs_dir = world
    s = make(keepalive=cli)
    with open(s.script.path, "w") as f:
        f.write("# stap-exporter: %s\n%s" % (header, BODY))
    s.start()
    spawned(fake, 1)
    vt.advance((stops_after or 100) - 0.01)
    gevent.sleep(0.01)
    assert s.live
    vt.advance(0.02)
    if stops_after is None:
        gevent.sleep(0.01)
        assert s.live and not fake.signals
    else:
        settle(lambda: s.state == "stopped", "idle stop")


def test_the_autostart_setting_overrides_the_name(world):
    make, vt, fake, _ = world
    plain, marked = make("plain.stp"), make("x-autostart.stp")
    for s, value in ((plain, "yes"), (marked, "no")):
        with open(s.script.path, "w") as f:
            f.write("# stap-exporter: autostart=%s\n%s" % (value, BODY))
        s.read_settings(file_identity(os.stat(s.script.path)))
    assert plain.autostart and not marked.autostart
    # An autostart script is exempt from --keepalive, not from its own.
    assert plain.keepalive is None
    assert plain.settings_text(5.0) == "keepalive=never autostart=yes scrape-timeout=5"


# -- the names the versions run under ------------------------------------------


def test_version_names_take_turns_are_valid_and_no_other_scripts(tmp_path):
    pid = 4194304
    cat = Catalog(str(tmp_path), pid=pid)
    names = ["a.stp", "a_.stp", "_a.stp", "a__b.stp", "z" * 200 + ".stp", "ünï.stp",
             "x" * 37 + ".stp", "x" * 38 + ".stp"]
    for n in names:
        (tmp_path / n).write_text(BODY)
    cat.rescan()
    own = {cat.get(n).module for n in names}
    edits = {naming.version_module(m, 1) for m in own}
    assert len(own) == len(edits) == len(names) and not own & edits
    for m in own:
        assert naming.version_module(m, 2) == m
    for m in edits:
        assert len(m) <= naming.MODULE_MAX and re.fullmatch(r"[a-z0-9_]+", m)
        match = naming.MODULE_RE.match(m)  # the start-up sweep's pattern
        assert match and naming.owner_pid(match.group(1)) == pid
    assert leftovers.MODULE_RE is naming.MODULE_RE


def test_every_key_is_a_settings_field():
    assert [k.replace("-", "_") for k in KEYS] == list(Settings._fields)
