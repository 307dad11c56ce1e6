"""Lean process trees end to end with the stand-in fakestap: a
plain script is compiled (``STAP -p4``) and then run by the loader alone;
--stap options go where the loader takes them, or the script falls back to
the driver; compiled modules survive an exporter restart in --cache-dir,
which is used only when trusted."""

import os
import re
import shlex
import stat
import time

from conftest import (Exporter, pid_alive, private_copy, process_group, stop_and_check,
                      wait_for, write_script)

# The stand-in compile of the cache test takes this long.
SLOW_COMPILE = 3


def argv_of(line):
    """The argv of a spawned/compiling log line (a quoted logfmt value)."""
    return shlex.split(line.split("argv=", 1)[1])[0].split()


def spawned_pid(exp, name, start=0):
    line = exp.wait_log(r"event=spawned script=%s " % re.escape(name), start=start)
    return int(re.search(r" pid=(\d+)", line).group(1)), line


def test_compile_then_loader_alone_with_loader_options(dirs, exporter_factory, tmp_path):
    """The compile gets the translator's options and -p4; the loader, alone
    in its process group, gets the run-time ones; the compile's working
    directory goes to the loader and is removed when it stops."""
    scripts, _ = dirs
    write_script(scripts, "plain.stp")
    from conftest import FAKESTAP
    stap = "%s -v -w -r /kb --runtime=bpf -x 1 -o %s" % (FAKESTAP, tmp_path / "out")
    exp = exporter_factory(["-k", "1"], stap=stap)
    assert exp.get_until("/plain.stp").status == 200
    compile_argv = argv_of(exp.wait_log(r"event=compiling script=plain\.stp "))
    module = exp.module_prefix + "plain"
    assert compile_argv[1:-1] == ["-v", "-w", "-r", "/kb", "--runtime=bpf", "-p4", "-m", module]
    assert private_copy(compile_argv[-1], "plain.stp"), compile_argv
    pid, line = spawned_pid(exp, "plain.stp")
    argv = argv_of(line)
    assert "run=load" in line
    assert os.path.basename(argv[0]) == "stapbpf"
    assert argv[1:-1] == ["-v", "-w", "-x", "1", "-o", str(tmp_path / "out")]
    assert argv[-1] == module + ".bo"
    wait_for(lambda: process_group(pid) == [pid], message="the compiler to be gone")
    assert exp.children() == [pid]
    workdir = os.readlink("/proc/%d/cwd" % pid)
    assert os.path.exists(os.path.join(workdir, argv[-1]))
    exp.wait_log(r"event=stopped script=plain\.stp ", timeout=10)
    assert not os.path.exists(workdir)


def test_the_compile_ends_before_the_loader_starts(dirs, exporter_factory):
    """The compile runs to its exit in a process of its own (whatever it
    prints); the loader is then spawned, and runs alone."""
    scripts, _ = dirs
    write_script(scripts, "silent.stp", "silent")
    exp = exporter_factory()
    assert exp.get_until("/silent.stp", timeout=30).status == 200
    line = exp.wait_log(r"event=compiling script=silent\.stp ")
    compiler = int(re.search(r" pid=(\d+)", line).group(1))
    loader, spawned = spawned_pid(exp, "silent.stp")
    assert loader != compiler and "run=load" in spawned
    assert not pid_alive(compiler)
    assert exp.children() == [loader]


def test_max_starting_counts_compiling_starts_until_their_output(dirs, exporter_factory):
    """--max-starting caps starts that compile: such a start holds its slot
    until its output appears, its loader's start included."""
    scripts, _ = dirs
    write_script(scripts, "slowload.stp", "load_delay=120")
    write_script(scripts, "other.stp")
    exp = exporter_factory(["--max-starting", "1"])
    first = exp.get("/slowload.stp")
    assert first.status == 503 and first.text.startswith("Refresh page"), first
    spawned_pid(exp, "slowload.stp")  # its loader runs; its output is two minutes away
    busy = exp.get("/other.stp")
    assert busy.status == 503 and "--max-starting" in busy.text, busy
    assert "event=compiling script=other.stp" not in exp.log_text()


def test_max_starting_does_not_count_kept_module_loads(dirs, exporter_factory, tmp_path):
    """Loading a kept module costs next to nothing: however long the loader
    takes to make its output, it holds no slot."""
    scripts, _ = dirs
    write_script(scripts, "kept.stp")
    write_script(scripts, "other.stp")
    args = ["--max-starting", "1", "--cache-dir", str(tmp_path / "cache")]
    first = exporter_factory(args)
    assert first.get_until("/kept.stp").status == 200
    first.wait_log(r"event=cache script=kept\.stp .*kept the compiled module")
    stop_and_check(first)
    exp = exporter_factory(args, env={"FAKESTAP_LOAD_DELAY": "120"})
    assert exp.get("/kept.stp").status == 503
    _, line = spawned_pid(exp, "kept.stp")
    assert "event=compiling script=kept.stp" not in exp.log_text()  # a kept module's load
    other = exp.get("/other.stp")
    assert other.status == 503 and other.text.startswith("Refresh page"), other
    exp.wait_log(r"event=compiling script=other\.stp ")


def test_failing_compile_is_a_failing_start(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "broken.stp", "fail stderr=before_the_error")
    exp = exporter_factory()
    r = exp.get_until("/broken.stp", 502)
    assert "semantic error: fake failure in broken.stp" in r.text, r.text
    assert "exit status 1" in r.text
    exp.wait_log(r"event=compiling script=broken\.stp ")
    assert "event=spawned script=broken.stp" not in exp.log_text()
    assert not exp.children()


def test_a_loader_that_cannot_run_alone_falls_back_to_the_driver(dirs, exporter_factory):
    """The loader alone fails right after a fresh compile (here: the sandbox's
    stapbpf without the environment stap's wrapper gives it): the same start
    goes on with the stap driver, which works, and so do later starts."""
    scripts, _ = dirs
    write_script(scripts, "picky.stp", "loader_fail")
    exp = exporter_factory(["-k", "1"])
    r = exp.get_until("/picky.stp")
    assert "fake_up" in r.text, r.text
    text = exp.log_text()
    assert re.search(r'level=warning event=driver script=picky\.stp pid=\d+ msg="the loader'
                     r' alone failed \(exit status 1\); running it through the stap driver',
                     text), text
    assert re.search(r"event=spawned script=picky\.stp .*run=driver", text), text
    assert "event=exited script=picky.stp" not in text
    mark = len(exp.log_lines)
    exp.wait_log(r"event=stopped script=picky\.stp", timeout=10, start=mark)
    assert exp.get_until("/picky.stp").status == 200      # the next start: driver at once
    line = exp.wait_log(r"event=spawned script=picky\.stp", start=mark)
    assert "run=driver" in line, line
    assert len(re.findall(r"event=driver script=picky", exp.log_text())) == 1


def test_options_the_loader_lacks_fall_back_to_the_driver_once(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    write_script(scripts, "b.stp")
    from conftest import FAKESTAP
    exp = exporter_factory(stap="%s -T 30" % FAKESTAP)
    for name in ("a.stp", "b.stp"):
        assert exp.get_until("/" + name).status == 200
        _pid, line = spawned_pid(exp, name)
        assert "run=driver" in line
        assert argv_of(line)[1:3] == ["-T", "30"] and "-p4" not in argv_of(line)
    text = exp.log_text()
    assert "event=compiling" not in text
    driver = re.findall(r'level=warning event=driver msg="option -T in --stap has no'
                        r' equivalent for the loaders; plain scripts run through the stap'
                        r' driver"', text)
    assert len(driver) == 1, text


def test_kept_module_survives_an_exporter_restart(dirs, tmp_path):
    """The second exporter loads the module the first one compiled: no
    compile child, first metrics well within the compile's time.  A new stap
    version (or --recompile) compiles again."""
    scripts, procfs = dirs
    cache = tmp_path / "cache"
    write_script(scripts, "slow.stp", "compile=%d" % SLOW_COMPILE)
    args = ["--cache-dir", str(cache)]
    first = Exporter(scripts, procfs, args=args)
    try:
        first.get_until("/slow.stp")
        first.wait_log(r"event=compiling script=slow\.stp ")
        # Kept once the first output was read (not during the start).
        first.wait_log(r"event=cache script=slow\.stp msg=\"kept the compiled module")
        entries = os.listdir(str(cache))
        assert len(entries) == 1 and entries[0].endswith(".bo"), entries
        assert stat.S_IMODE(os.stat(str(cache)).st_mode) == 0o700
    finally:
        stop_and_check(first)
    assert os.listdir(str(cache)) == entries, "the cache must survive the exporter"
    second = Exporter(scripts, procfs, args=args)
    try:
        t0 = time.monotonic()
        second.get_until("/slow.stp")
        assert time.monotonic() - t0 < SLOW_COMPILE - 1
        _pid, line = spawned_pid(second, "slow.stp")
        assert "run=load" in line and argv_of(line)[-1] == second.module_prefix + "slow.bo"
        assert "event=compiling" not in second.log_text()
    finally:
        stop_and_check(second)
    upgraded = Exporter(scripts, procfs, args=args, env={"FAKESTAP_VERSION": "2"})
    try:
        upgraded.get_until("/slow.stp")
        upgraded.wait_log(r"event=compiling script=slow\.stp ")
    finally:
        stop_and_check(upgraded)
    assert len(os.listdir(str(cache))) == 2


def test_untrusted_cache_dir_is_refused_once(dirs, exporter_factory, tmp_path):
    """A cache directory others can write is not used (one log line); the
    exporter keeps modules in a private cache for its own lifetime."""
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    write_script(scripts, "b.stp")
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    os.chmod(str(cache), 0o777)
    exp = exporter_factory(["-k", "1", "--cache-dir", str(cache)])
    for name in ("a.stp", "b.stp"):
        exp.get_until("/" + name)
    refused = re.findall(r"level=warning event=cache dir=%s msg=\".*is writable by group and"
                         r" others \(mode 0777\); compiled modules are kept for this process"
                         r" only\"" % re.escape(str(cache)), exp.log_text())
    assert len(refused) == 1, exp.log_text()
    assert os.listdir(str(cache)) == []
    # Reused all the same, within this process: after a keepalive stop the
    # next start loads the kept module.
    exp.wait_log(r"event=stopped script=a\.stp ", timeout=10)
    mark = len(exp.log_lines)
    exp.get_until("/a.stp")
    _pid, line = spawned_pid(exp, "a.stp", start=mark)
    assert "run=load" in line


def test_recompile_compiles_every_start_and_keeps_nothing(dirs, exporter_factory, tmp_path):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    cache = tmp_path / "cache"
    exp = exporter_factory(["-k", "1", "--recompile", "--cache-dir", str(cache)])
    exp.get_until("/a.stp")
    exp.wait_log(r"event=stopped script=a\.stp ", timeout=10)
    exp.get_until("/a.stp")
    wait_for(lambda: len(re.findall(r"event=compiling script=a\.stp ", exp.log_text())) == 2,
             message="a second compile")
    assert not os.path.exists(str(cache))


def test_loader_plan_sorts_the_stap_options():
    """Which option goes where, per runtime (no daemon needed)."""
    from stapexporter_lib.scripts.build import Plan
    plan = Plan(["stap", "--runtime=kernel", "-rKB", "-vv", "-s", "8", "-G", "limit=5",
                 "-c", "ls -l"])
    assert plan.driver_reason is None
    assert plan.compile_argv("m", "/s.stp") == ["stap", "--runtime=kernel", "-rKB", "-vv",
                                                "-p4", "-m", "m", "/s.stp"]
    assert plan.loader_refusal(".bo") == "option -s in --stap has no equivalent for stapbpf"
    if plan.loader_refusal(".ko") is None:  # staprun is installed
        assert plan.loader_argv(".ko", "m.ko")[1:] == ["-vv", "-c", "ls -l", "-b", "8", "m.ko",
                                                      "limit=5"]
    assert Plan(["stap", "-T", "5"]).driver_reason == \
        "option -T in --stap has no equivalent for the loaders"
    assert Plan(["stap", "-o"]).driver_reason == "option -o in --stap has no value"
