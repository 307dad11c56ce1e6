"""Script lifecycles end to end: keepalive, autostart, backoff, rescans,
signals, clean-up.  Every wait is on a condition with a deadline."""

import os
import re
import signal
import shlex
import time


from conftest import pid_alive, private_copy, wait_for, write_script


def index_rows(exporter):
    rows = {}
    for line in exporter.get("/").text.split("\n\n")[0].splitlines()[2:]:
        cols = line.split()
        rows[cols[0]] = {"state": cols[1], "pid": cols[2], "starts": int(cols[4]),
                         "error": " ".join(cols[5:])}
    return rows


def row(exporter, name):
    return index_rows(exporter).get(name)


def leftovers(*dirs):
    found = []
    for d in dirs:
        for root, subdirs, files in os.walk(str(d)):
            found += [os.path.join(root, f) for f in files
                      if f.endswith((".bo", ".ko"))]
    return found


def workdirs(exporter):
    import tempfile
    tmp = tempfile.gettempdir()
    return [e for e in os.listdir(tmp)
            if e.startswith("stap-exporter.%d." % exporter.proc.pid)
            and not e.startswith("stap-exporter.%d.cache." % exporter.proc.pid)]


def cachedirs(exporter):
    import tempfile
    return [e for e in os.listdir(tempfile.gettempdir())
            if e.startswith("stap-exporter.%d.cache." % exporter.proc.pid)]


def test_keepalive_stops_idle_script_and_request_restarts_it(dirs, exporter_factory):
    scripts, procfs = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory(["-k", "1"])
    exp.get_until("/a.stp")
    pid = int(row(exp, "a.stp")["pid"])
    assert pid_alive(pid)
    wait_for(lambda: not pid_alive(pid), timeout=10, message="idle script to stop")
    wait_for(lambda: row(exp, "a.stp")["state"] == "stopped", timeout=5)
    exp.wait_log(r'event=stopping script=a\.stp pid=%d reason="idle' % pid)
    assert not exp.children()
    assert not os.listdir(str(procfs)), "module directory left behind"
    assert not workdirs(exp), "working directory left behind"
    assert not leftovers(scripts, procfs)
    # The next request starts it again.
    exp.get_until("/a.stp")
    assert row(exp, "a.stp")["starts"] == 2


def test_autostart_runs_without_any_request(dirs, exporter_factory):
    # (That keepalive does not stop autostart scripts, and that nothing stops
    # without keepalive, is checked on a virtual clock in test_session.py.)
    scripts, procfs = dirs
    write_script(scripts, "ticks-autostart.stp")
    exp = exporter_factory(["-k", "1"])
    exp.wait_log(r"event=spawned script=ticks-autostart\.stp")
    wait_for(lambda: any(os.path.exists(os.path.join(str(procfs), d, "__prometheus"))
                         for d in os.listdir(str(procfs))), message="autostart output")
    pid = wait_for(lambda: exp.children(), message="autostart child")[0]
    assert pid_alive(pid)


def test_autostart_restarts_after_being_killed(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "x-autostart.stp")
    exp = exporter_factory()
    first = wait_for(lambda: exp.children(), message="autostart child")[0]
    os.kill(first, signal.SIGKILL)
    exp.wait_log(r'event=exited script=x-autostart\.stp pid=%d msg="\(killed by SIGKILL' % first)
    exp.wait_log(r'event=backoff script=x-autostart\.stp msg="restarting in 1 s')
    second = wait_for(lambda: [p for p in exp.children() if p != first], timeout=10,
                      message="restarted child")[0]
    assert second != first
    assert exp.get_until("/x-autostart.stp").status == 200


def test_crashing_autostart_backs_off(dirs, exporter_factory):
    # (The doubling up to 60 s and its reset are checked on a virtual clock
    # in test_session.py.)
    scripts, _ = dirs
    write_script(scripts, "crash-autostart.stp", "fail")
    exp = exporter_factory()
    exp.wait_log(r"event=backoff script=crash-autostart\.stp msg=\"restarting in 1 s after exit"
                 r" status 1")
    r = exp.get("/crash-autostart.stp")
    assert r.status == 503
    assert "semantic error" in r.text or "exit status 1" in r.text
    assert r.header("Retry-After")


def test_stderr_is_logged_with_the_script_name(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "talk.stp", "stderr=hello_from_the_script")
    exp = exporter_factory()
    exp.get_until("/talk.stp")
    exp.wait_log(r'event=stderr script=talk\.stp pid=\d+ msg="hello from the script')


def test_executable_script_runs_directly_with_module_appended(dirs, exporter_factory):
    scripts, procfs = dirs
    write_script(scripts, "wrapped.stp", executable=True)
    exp = exporter_factory()
    assert exp.get_until("/wrapped.stp").status == 200
    line = exp.wait_log(r"event=spawned script=wrapped\.stp")
    argv = shlex.split(line.split("argv=", 1)[1])[0].split()
    assert private_copy(argv[0], "wrapped.stp"), argv
    assert argv[1] == "-m" and argv[2].startswith(exp.module_prefix)
    assert len(argv) == 3


def test_plain_script_is_compiled_by_stap_then_run_by_the_loader(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "plain.stp")
    exp = exporter_factory()
    exp.get_until("/plain.stp")
    line = exp.wait_log(r"event=compiling script=plain\.stp")
    argv = shlex.split(line.split("argv=", 1)[1])[0].split()
    assert argv[0].endswith("fakestap")
    assert argv[1:3] == ["-p4", "-m"] and private_copy(argv[4], "plain.stp"), argv
    line = exp.wait_log(r"event=spawned script=plain\.stp")
    argv = shlex.split(line.split("argv=", 1)[1])[0].split()
    assert os.path.basename(argv[0]) == "stapbpf"
    assert argv[1:] == ["%splain.bo" % exp.module_prefix], argv


def test_module_names_are_valid_unique_and_stable(dirs, exporter_factory):
    scripts, _ = dirs
    names = ["Upper-Case.stp", "upper_case.stp", "x" * 80 + ".stp", "dots.in.name.stp"]
    for n in names:
        write_script(scripts, n)
    exp = exporter_factory(["-k", "1"])
    modules, pids = {}, {}
    for n in names:
        exp.get_until("/" + n)
        spawned = re.search(r"event=spawned script=%s pid=(\d+) module=(\S+)" % re.escape(n),
                            exp.wait_log(r"event=spawned script=%s " % re.escape(n)))
        pids[n], modules[n] = int(spawned.group(1)), spawned.group(2)
    for m in modules.values():
        assert re.fullmatch(r"[a-z0-9_]{1,55}", m), m
        assert m.startswith(exp.module_prefix)
    assert len(set(modules.values())) == len(names)
    # Stable across a keepalive stop and restart.  (The pid comes from the
    # log: with -k 1 the first script may have stopped already.)
    pid = pids[names[0]]
    wait_for(lambda: not pid_alive(pid), timeout=10)
    mark = len(exp.log_lines)
    exp.get_until("/" + names[0])
    line = exp.wait_log(r"event=spawned script=%s " % re.escape(names[0]), start=mark)
    assert "module=%s " % modules[names[0]] in line


def test_children_have_own_group_devnull_stdin_private_cwd(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory()
    exp.get_until("/a.stp")
    pid = int(row(exp, "a.stp")["pid"])
    assert os.getpgid(pid) == pid != os.getpgid(exp.proc.pid)
    assert os.readlink("/proc/%d/fd/0" % pid) == "/dev/null"
    cwd = os.readlink("/proc/%d/cwd" % pid)
    assert os.path.basename(cwd).startswith("stap-exporter.%d." % exp.proc.pid)
    assert os.path.exists(os.path.join(cwd, os.listdir(cwd)[0]))  # MODULE.bo is there
    # No listening or client socket leaks into the child.
    fds = os.listdir("/proc/%d/fd" % pid)
    links = [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in fds]
    assert not [l for l in links if l.startswith("socket:")], links
    exp.stop()
    assert not os.path.exists(cwd)


def test_sigterm_stops_every_child_and_exits_zero(dirs, exporter_factory):
    scripts, procfs = dirs
    write_script(scripts, "a.stp")
    write_script(scripts, "b.stp", "mode=fifo")
    write_script(scripts, "c-autostart.stp", "child")
    write_script(scripts, "d.stp", "compile=60")
    exp = exporter_factory()
    exp.get_until("/a.stp")
    exp.get_until("/b.stp")
    exp.get("/d.stp", headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.35"})  # starts it
    wait_for(lambda: len(exp.children()) >= 4, message="four children")
    # the autostart's own child (a 'sleep', like stapbpf under stap)
    group = os.getpgid(int(row(exp, "c-autostart.stp")["pid"]))
    exp.signal(signal.SIGTERM)
    assert exp.proc.wait(15) == 0
    assert not exp.children()
    assert not _group_alive(group)
    assert not os.listdir(str(procfs))
    assert not leftovers(scripts, procfs)
    assert not workdirs(exp)
    assert not cachedirs(exp)


def test_sigint_also_shuts_down_cleanly(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory()
    exp.get_until("/a.stp")
    exp.signal(signal.SIGINT)
    assert exp.proc.wait(15) == 0
    assert not exp.children()


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(pid_alive(int(p)) and os.getpgid(int(p)) == pgid
               for p in os.listdir("/proc") if p.isdigit() and _safe_pgid(int(p)) == pgid)


def _safe_pgid(pid):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_sigkill_of_exporter_takes_children_with_it(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    write_script(scripts, "b.stp", "mode=fifo")
    write_script(scripts, "c-autostart.stp")
    # A compile: the compiler alone.
    write_script(scripts, "d.stp", "compile=60")
    exp = exporter_factory()
    exp.get_until("/a.stp")
    exp.get_until("/b.stp")
    exp.get("/d.stp")
    wait_for(lambda: len(exp.children()) == 4, message="four processes")
    children = exp.children()
    exp.signal(signal.SIGKILL)
    exp.proc.wait(5)
    wait_for(lambda: not any(pid_alive(p) for p in children), timeout=10,
             message="children to die with the exporter")


def test_script_ignoring_sigterm_is_killed_after_the_grace(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "stubborn.stp", "ignore_term")
    exp = exporter_factory(["-k", "1", "--stop-timeout", "1"])
    exp.get_until("/stubborn.stp")
    pid = int(row(exp, "stubborn.stp")["pid"])
    exp.wait_log(r'event=kill script=stubborn\.stp pid=%d msg="did not stop within 1 s' % pid,
                 timeout=10)
    wait_for(lambda: not pid_alive(pid), timeout=5)
    wait_for(lambda: row(exp, "stubborn.stp")["state"] == "stopped", timeout=5)


def test_wrapper_children_are_stopped_with_the_group(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "parent.stp", "child")
    exp = exporter_factory(["-k", "1"])
    exp.get_until("/parent.stp")
    pid = int(row(exp, "parent.stp")["pid"])
    members = wait_for(lambda: [p for p in _group_members(pid) if p != pid],
                       message="the script's own child")
    wait_for(lambda: not pid_alive(pid) and not any(pid_alive(m) for m in members),
             timeout=15, message="the whole group to stop")


def _group_members(pgid):
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and _safe_pgid(int(p)) == pgid and pid_alive(int(p))]


def test_new_script_is_found_on_demand(dirs, exporter_factory):
    scripts, _ = dirs
    exp = exporter_factory()
    assert exp.get("/late.stp").status == 404
    write_script(scripts, "late.stp")
    assert exp.get_until("/late.stp").status == 200


def test_sighup_rescans_and_starts_new_autostart(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory()
    assert "b.stp" not in index_rows(exp)
    write_script(scripts, "b.stp")
    write_script(scripts, "new-autostart.stp")
    exp.signal(signal.SIGHUP)
    exp.wait_log(r'event=rescan msg="3 scripts \(added: b\.stp, new-autostart\.stp')
    assert "b.stp" in index_rows(exp)
    exp.wait_log(r"event=spawned script=new-autostart\.stp")


def test_removed_script_serves_until_stopped_then_404(dirs, exporter_factory):
    scripts, _ = dirs
    path = write_script(scripts, "gone.stp")
    exp = exporter_factory(["-k", "1"])
    exp.get_until("/gone.stp")
    pid = int(row(exp, "gone.stp")["pid"])
    os.unlink(path)
    exp.signal(signal.SIGHUP)
    exp.wait_log(r"removed: gone\.stp")
    wait_for(lambda: not pid_alive(pid), timeout=10)
    wait_for(lambda: exp.get("/gone.stp").status == 404, timeout=5)
    assert "gone.stp" not in index_rows(exp)
    assert not exp.children()


def test_removed_file_without_rescan_is_404_once_stopped(dirs, exporter_factory):
    scripts, _ = dirs
    path = write_script(scripts, "gone.stp")
    exp = exporter_factory()
    assert exp.get("/").status == 200
    os.unlink(path)
    assert exp.get("/gone.stp").status == 404
    assert not exp.children()


def test_symlinks_and_dotfiles(dirs, exporter_factory, tmp_path):
    scripts, _ = dirs
    outside = write_script(tmp_path, "real.stp")
    inside = write_script(scripts, "target.txt")
    os.symlink(inside, str(scripts / "linked.stp"))
    os.symlink(outside, str(scripts / "outside.stp"))
    os.symlink(str(tmp_path / "missing"), str(scripts / "dangling.stp"))
    write_script(scripts, ".hidden.stp")
    os.mkdir(str(scripts / "dir.stp"))
    exp = exporter_factory()
    assert sorted(index_rows(exp)) == ["linked.stp"]
    assert exp.get_until("/linked.stp").status == 200
    exp.wait_log(r"ignoring outside\.stp: it links outside the scripts directory")
    for path in ("/outside.stp", "/.hidden.stp", "/dangling.stp", "/dir.stp"):
        assert exp.get(path).status == 404, path
    exp.settled_children(1)


def test_follow_symlinks_serves_links_to_outside(dirs, exporter_factory, tmp_path):
    scripts, _ = dirs
    os.symlink(write_script(tmp_path, "real.stp"), str(scripts / "outside.stp"))
    exp = exporter_factory(["--follow-symlinks"])
    assert exp.get_until("/outside.stp").status == 200


def test_fifo_never_written_does_not_delay_other_scripts(dirs, exporter_factory):
    import threading
    scripts, _ = dirs
    write_script(scripts, "mute.stp", "mode=fifo never_write")
    write_script(scripts, "fine.stp")
    # The stuck scrapes give up after 2 s, still long after fine.stp's ten.
    exp = exporter_factory(["--scrape-timeout", "2"])
    exp.get_until("/fine.stp")
    exp.get("/mute.stp")  # starts it
    wait_for(lambda: row(exp, "mute.stp")["state"] in ("starting", "running"))
    stuck = []

    def scrape_mute():
        stuck.append(exp.get("/mute.stp", timeout=20).status)
    threads = [threading.Thread(target=scrape_mute) for _ in range(5)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            t0 = time.monotonic()
            assert exp.get("/fine.stp", timeout=5).status == 200
            assert time.monotonic() - t0 < 1.0
    finally:
        for t in threads:
            t.join(20)
    assert stuck and all(s == 503 for s in stuck)


def test_spawn_failure_is_502(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory(stap="/nonexistent/stap")
    r = exp.get("/a.stp")
    assert r.status == 502
    assert "cannot run /nonexistent/stap" in r.text


def test_stale_fifo_from_an_earlier_run_is_removed_before_start(dirs, exporter_factory):
    scripts, procfs = dirs
    write_script(scripts, "stale.stp", "mode=fifo")
    exp = exporter_factory()
    module_dir = procfs / (exp.module_prefix + "stale")
    module_dir.mkdir()
    os.mkfifo(str(module_dir / "__prometheus"))  # no writer will ever come
    r = exp.get_until("/stale.stp", timeout=10)
    assert "fake_up" in r.text
    exp.wait_log(r'event=stale script=stale\.stp msg="removed .*%s' % re.escape(str(module_dir)))
