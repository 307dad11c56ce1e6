"""The session's state machine in-process, on a virtual clock with a fake
process: backoff doubling and reset, keepalive deadlines, stop escalation,
the single-flight read, the manager's caps.  Fast and exact: no real time
passes between events, no real process is started or signalled.

The end-to-end tests (test_lifecycle.py) check the same behaviour once with
real processes; these cover the timing rules that would otherwise need
seconds of real time per case."""

import collections
import logging
import os
import signal
import sys

import gevent
import gevent.event
import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from stapexporter_lib.scripts import output as procfs  # noqa: E402
from stapexporter_lib.scripts.catalog import Script  # noqa: E402
from stapexporter_lib.scripts.manager import Manager  # noqa: E402
from stapexporter_lib.scripts.output import OutputReader  # noqa: E402
from stapexporter_lib.scripts.session import Outcome, Session, SessionConfig  # noqa: E402

# Fake pids lie above the kernel's largest pid (4194304): never a real process.
FIRST_FAKE_PID = 5_000_000
# Real seconds a test waits for the greenlets to catch up with an event.
SETTLE = 5.0


class VirtualTime:
    """A clock that moves only when the test says so, and the session's
    ``wait`` on that clock: a wait ends when one of its objects is ready or
    when the clock has been advanced past its timeout."""

    def __init__(self):
        self.now = 1000.0
        self._tick = gevent.event.Event()

    def clock(self):
        return self.now

    def wait(self, objects, timeout=None):
        deadline = None if timeout is None else self.now + timeout
        while True:
            ready = [o for o in objects if o.ready()]
            if ready:
                return ready
            if deadline is not None and self.now >= deadline:
                return []
            gevent.wait(list(objects) + [self._tick], count=1)

    def advance(self, seconds):
        self.now += seconds
        tick, self._tick = self._tick, gevent.event.Event()
        tick.set()
        gevent.sleep(0)


def settle(predicate, message="condition"):
    """Let the greenlets run until PREDICATE holds (real deadline)."""
    with gevent.Timeout(SETTLE, AssertionError("never came true: %s" % message)):
        while not predicate():
            gevent.sleep(0.001)


class FakeProc:
    """A process as gevent's Popen shows it, writing to the output pipes it
    was given (its own copies of their write ends, as a child has)."""

    def __init__(self, pid, argv, kwargs):
        self.pid = pid
        self.argv = argv
        self.kwargs = kwargs
        self.returncode = None
        self.result = gevent.event.AsyncResult()
        self.ignore_term = False
        self.stragglers = False  # other members of its group outlive it
        # (Without pipes, a bare process for the reader's tests.)
        self._out_w = os.dup(kwargs["stdout"]) if "stdout" in kwargs else os.open(os.devnull,
                                                                                    os.O_WRONLY)
        self._err_w = os.dup(kwargs["stderr"]) if "stderr" in kwargs else os.dup(self._out_w)

    def say(self, line):
        os.write(self._err_w, line.encode() + b"\n")

    def exit(self, code):
        if self.returncode is None:
            os.close(self._out_w)
            os.close(self._err_w)
            self.returncode = code
            self.result.set(code)

    def exited(self):
        return self.result.ready()

    exited_unreaped = exited  # a fake has no zombie: its exit is seen at once

    def group_alive(self):
        return self.returncode is None or self.stragglers


class FakeOS:
    """popen and killpg for sessions: records every spawn and signal."""

    def __init__(self):
        self.procs = collections.OrderedDict()  # pid -> FakeProc
        self.signals = []                       # (pid, signal)
        self.leader_signals = []                # (pid, signal) to the leader alone

    def popen(self, argv, **kwargs):
        pid = FIRST_FAKE_PID + len(self.procs)
        proc = self.procs[pid] = FakeProc(pid, argv, kwargs)
        return proc

    def kill(self, pid, sig):
        """The group leader alone; recorded in both lists."""
        self.leader_signals.append((pid, sig))
        self.killpg(pid, sig)

    def killpg(self, pgid, sig):
        proc = self.procs[pgid]  # a KeyError here would be a real pid: a bug
        self.signals.append((pgid, sig))
        if not proc.group_alive():
            raise ProcessLookupError(pgid)
        if sig == signal.SIGKILL:
            proc.stragglers = False
            proc.exit(-signal.SIGKILL)
        elif sig == signal.SIGTERM and not proc.ignore_term:
            proc.exit(-signal.SIGTERM)

    @property
    def last(self):
        return next(reversed(self.procs.values()))


@pytest.fixture
def world(tmp_path):
    """(make_session, VirtualTime, FakeOS, procfs dir); every session is
    stopped at the end."""
    vt, fake = VirtualTime(), FakeOS()
    procfs_dir = tmp_path / "procfs"
    procfs_dir.mkdir()
    sessions = []

    def make(name="a.stp", keepalive=None, stop_grace=5.0, start_wait=1.0, popen=None):
        path = tmp_path / name
        path.write_text("probe begin {}\n")
        script = Script(name, str(path), "stapexp_1_" + name.split(".")[0].replace("-", "_"))
        config = SessionConfig(stap=["/nonexistent/stap"], procfs_dirs=[str(procfs_dir)],
                               keepalive=keepalive, start_wait=start_wait,
                               stop_grace=stop_grace, workdir_root=str(tmp_path),
                               max_output=procfs.DEFAULT_MAX_BYTES, plan=None, cache=None,
                               insecure_scripts=False, max_series=None)
        session = Session(script, config, clock=vt.clock, popen=popen or fake.popen,
                          wait=vt.wait, killpg=fake.killpg, kill=fake.kill)
        sessions.append(session)
        return session
    yield make, vt, fake, procfs_dir
    for proc in fake.procs.values():  # their output pipes close: nothing to drain
        proc.exit(0)
    for session in sessions:
        if session._watchdog is not None:
            session._watchdog.kill(block=True, timeout=SETTLE)


def spawned(fake, count):
    settle(lambda: len(fake.procs) >= count, "%d spawns" % count)
    return fake.last


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run(world):
    make, vt, fake, _ = world
    s = make("crash-autostart.stp")
    s.start()
    delays = []
    for n in range(1, 10):
        spawned(fake, n).exit(1)
        settle(lambda: s.state == "backoff", "backoff")
        delays.append(s.backoff_until - vt.now)
        assert len(fake.procs) == n  # nothing restarts before the delay ends
        vt.advance(delays[-1] - 0.001)
        assert s.state == "backoff" and len(fake.procs) == n
        vt.advance(0.001)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert s.restarts == 9 and s.exits["error"] == 9
    # A run of 30 s or more starts the backoff afresh.
    proc = spawned(fake, 10)
    vt.advance(30)
    proc.exit(1)
    settle(lambda: s.state == "backoff", "backoff")
    assert s.backoff_until - vt.now == 1
    assert s.last_error == "exit status 1"


def crashed_autostart(world, code=1):
    """An autostart session whose first run exited with CODE: in BACKOFF."""
    make, vt, fake, _ = world
    s = make("crash-autostart.stp")
    s.start()
    spawned(fake, 1).exit(code)
    settle(lambda: s.state == "backoff", "backoff")
    return s


def test_a_stop_during_backoff_ends_it_at_once(world):
    fake = world[2]
    s = crashed_autostart(world)
    s.stop(timeout=SETTLE)
    assert s.state == "stopped" and not s.live and len(fake.procs) == 1


def test_keepalive_stops_a_script_idle_for_the_period_and_requests_reset_it(world):
    make, vt, fake, _ = world
    s = make(keepalive=10)
    s.start()
    proc = spawned(fake, 1)
    for _ in range(3):  # a request every 9.9 s keeps it running
        vt.advance(9.9)
        assert not fake.signals and s.state == "starting"
        s.touch()
    vt.advance(9.9)
    assert not fake.signals
    vt.advance(0.2)
    settle(lambda: s.state == "stopped", "keepalive stop")
    assert fake.signals == [(proc.pid, signal.SIGTERM), (proc.pid, signal.SIGTERM)]  # leader, group
    assert s.exits["stopped"] == 1 and s.pid is None and not s.live


def test_a_request_waiting_for_a_slow_start_keeps_the_script_from_idling(world):
    """A start longer than the keepalive: the request waiting for it is not
    idleness (the script used to be stopped under it, before its first
    output); idle time counts from the end of the last request."""
    make, vt, fake, procfs_dir = world
    s = make(keepalive=1, start_wait=3)
    scrape = gevent.spawn(s.scrape, 5)
    proc = spawned(fake, 1)
    vt.advance(2.5)
    assert s.state == "starting" and not fake.signals and not scrape.ready()
    write_output(procfs_dir, s)
    vt.advance(0.1)
    assert scrape.get(timeout=SETTLE).kind == Outcome.OK
    vt.advance(0.9)
    assert s.state == "running" and not fake.signals
    vt.advance(1.0)
    settle(lambda: s.state == "stopped", "keepalive stop after the request")
    assert fake.signals[0] == (proc.pid, signal.SIGTERM)


@pytest.mark.parametrize("name,keepalive", [("a.stp", None), ("x-autostart.stp", 1)])
def test_without_keepalive_or_for_autostart_scripts_nothing_stops(world, name, keepalive):
    make, vt, fake, _ = world
    s = make(name, keepalive=keepalive)
    s.start()
    spawned(fake, 1)
    vt.advance(10 ** 6)
    gevent.sleep(0.01)
    assert not fake.signals and s.state == "starting" and s.live


def stop_running(world, **behaviour):
    """Start a session (stop_grace 5 s) whose process has BEHAVIOUR, then
    stop it in a greenlet; returns (session, process, stopping greenlet)."""
    make, _, fake, _ = world
    s = make(stop_grace=5)
    s.start()
    proc = spawned(fake, 1)
    for key, value in behaviour.items():
        setattr(proc, key, value)
    return s, proc, gevent.spawn(s.stop)


def test_stop_escalates_from_sigterm_to_sigkill_after_the_grace(world, caplog):
    _, vt, fake, _ = world
    s, proc, stopper = stop_running(world, ignore_term=True)
    settle(lambda: fake.signals, "SIGTERM")
    assert fake.signals == [(proc.pid, signal.SIGTERM)] and s.state == "stopping"
    assert fake.leader_signals == [(proc.pid, signal.SIGTERM)]  # the leader first, alone
    vt.advance(4.9)
    assert fake.signals == [(proc.pid, signal.SIGTERM)]
    with caplog.at_level(logging.INFO, logger="stap-exporter"):
        vt.advance(0.1)
        stopper.join(SETTLE)
    assert fake.signals[1] == (proc.pid, signal.SIGKILL)
    assert s.state == "stopped" and proc.returncode == -signal.SIGKILL
    assert "did not stop within 5 s; sending SIGKILL" in caplog.text
    assert "(killed by SIGKILL)" in caplog.text


def test_group_members_outliving_the_leader_get_the_grace_then_sigkill(world, caplog):
    _, vt, fake, _ = world
    s, proc, stopper = stop_running(world, stragglers=True)
    settle(lambda: proc.returncode is not None and len(fake.signals) >= 2, "group SIGTERM")
    assert fake.signals[:2] == [(proc.pid, signal.SIGTERM)] * 2
    vt.advance(4.9)
    gevent.sleep(0.01)
    assert signal.SIGKILL not in [sig for _, sig in fake.signals]
    with caplog.at_level(logging.WARNING, logger="stap-exporter"):
        vt.advance(0.2)
        stopper.join(SETTLE)
    assert fake.signals[-1] == (proc.pid, signal.SIGKILL)
    assert "outlived its leader; sending SIGKILL" in caplog.text
    assert s.state == "stopped"


def test_exit_of_an_on_demand_script_is_reported_once_with_its_stderr(world):
    make, vt, fake, _ = world
    s = make()
    s.start()
    proc = spawned(fake, 1)
    proc.say("semantic error: no such probe")
    proc.exit(1)
    settle(lambda: s.state == "failed", "failed")
    outcome = s.scrape(5)
    assert outcome.kind == Outcome.FAILED
    assert "exit status 1" in outcome.message and "semantic error: no such probe" in outcome.message
    assert s.state == "stopped"


def test_a_scrape_of_a_starting_script_waits_start_wait_then_serves_the_output(world):
    make, vt, fake, procfs_dir = world
    s = make(start_wait=1.0)
    scrape = gevent.spawn(s.scrape, 5)
    spawned(fake, 1)
    vt.advance(0.9)
    assert not scrape.ready()
    vt.advance(0.1)
    outcome = scrape.get(timeout=SETTLE)
    assert (outcome.kind, outcome.retry_after) == (Outcome.NOT_READY, 2)
    module_dir = procfs_dir / s.script.module
    module_dir.mkdir()
    (module_dir / "__prometheus").write_bytes(b"up 1\nbad{x=\"\xff\"} 2")
    outcome = s.scrape(5)
    assert outcome.kind == Outcome.OK and s.state == "running"
    assert outcome.body == "up 1\nbad{x=\"\ufffd\"} 2\n".encode()  # repaired and completed
    assert s.last_output_bytes == len(outcome.body)


def test_spawn_failure_of_an_on_demand_script_fails_it(world):
    make, vt, fake, _ = world

    def refuse(argv, **kw):
        raise FileNotFoundError(2, "No such file or directory")
    s = make(popen=refuse)
    s.start()
    settle(lambda: s.state == "failed", "failed")
    assert s.exits["spawn_error"] == 1
    assert s.last_error == "cannot run /nonexistent/stap: No such file or directory"


# -- the single-flight read ------------------------------------------------------


class GatedRead:
    """procfs.read_output stand-in: counts calls, answers when released."""

    def __init__(self):
        self.calls = 0
        self.gate = gevent.event.AsyncResult()

    def __call__(self, path, timeout, max_bytes, clock):
        self.calls += 1
        return self.gate.get(timeout=timeout)


def reader_with(read):
    reader = OutputReader("a.stp", "stapexp_1_a", [], procfs.DEFAULT_MAX_BYTES, lambda: 0.0,
                          read=read)
    reader.path = "/nonexistent/__prometheus"
    return reader


def test_concurrent_reads_share_one_read():
    read = GatedRead()
    reader = reader_with(read)
    readers = [gevent.spawn(reader.read, 5, None) for _ in range(10)]
    gevent.sleep(0)
    assert read.calls == 1
    read.gate.set(b"up 1")
    assert [g.get(timeout=SETTLE) for g in readers] == [b"up 1\n"] * 10
    # The next read is a new one.
    read.gate = gevent.event.AsyncResult()
    read.gate.set(b"up 2\n")
    assert reader.read(5, None) == b"up 2\n" and read.calls == 2


def test_a_failed_read_fails_every_waiter_and_the_next_read_tries_again():
    read = GatedRead()
    reader = reader_with(read)
    readers = [gevent.spawn(reader.read, 5, None) for _ in range(3)]
    gevent.sleep(0)
    read.gate.set_exception(procfs.OutputError("cannot read output FIFO: I/O error"))
    for g in readers:
        with pytest.raises(procfs.OutputError, match="I/O error"):
            g.get(timeout=SETTLE)
    assert read.calls == 1
    read.gate = gevent.event.AsyncResult()
    read.gate.set(b"up 1\n")
    assert reader.read(5, None) == b"up 1\n" and read.calls == 2


def test_output_cut_short_by_an_exit_is_an_error():
    read = GatedRead()
    read.gate.set(b"up 1\nhal")
    reader = reader_with(read)
    run = FakeProc(FIRST_FAKE_PID, [], {})
    gevent.spawn_later(0.01, run.exit, 0)
    with pytest.raises(procfs.OutputError, match="exited while writing"):
        reader.read(5, run)


# -- the manager's caps, with sessions on the fake process ---------------------------


def test_manager_queues_starts_over_max_starting(world, tmp_path):
    """Over --max-starting, a request's start is queued: the request waits
    for its turn within the start wait, then gets busy (Retry-After 2); the
    script starts by itself as soon as a start ends (here: the first one,
    idle for --keepalive, is stopped), oldest first, and its idle time
    counts from that start, not from the request that queued it."""
    make, vt, fake, procfs_dir = world
    from stapexporter_lib.scripts.catalog import Catalog
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("a.stp", "b.stp", "c.stp"):
        (scripts / name).write_text("probe begin {}\n")
    catalog = Catalog(str(scripts), pid=1)
    config = SessionConfig(stap=["/nonexistent/stap"], procfs_dirs=[str(procfs_dir)],
                           keepalive=1.0, start_wait=0.5, stop_grace=5.0,
                           workdir_root=str(tmp_path), max_output=procfs.DEFAULT_MAX_BYTES,
                           plan=None, cache=None, insecure_scripts=False, max_series=None)

    def factory(script, config, clock, admit, start_slots):
        return Session(script, config, clock=clock, admit=admit, start_slots=start_slots,
                       popen=fake.popen, wait=vt.wait, killpg=fake.killpg, kill=fake.kill)
    manager = Manager(catalog, config, max_running=3, max_starting=1, clock=vt.clock,
                      session_factory=factory)
    manager.start()
    first = gevent.spawn(manager.get("a.stp").scrape, 5)
    spawned(fake, 1)
    second = gevent.spawn(manager.get("b.stp").scrape, 5)
    third = gevent.spawn(manager.get("c.stp").scrape, 5)
    # Each start reads its file in the thread pool before it asks for a slot.
    settle(lambda: manager.get("b.stp").queued and manager.get("c.stp").queued,
           "b.stp and c.stp to be queued")
    vt.advance(0.5)
    for waiting in (second, third):
        busy = waiting.get(timeout=SETTLE)
        assert busy.kind == Outcome.BUSY and busy.retry_after == 2
        assert "1 scripts are starting" in busy.message and "--max-starting" in busy.message
        assert "queued" in busy.message
    assert first.get(timeout=SETTLE).kind == Outcome.NOT_READY
    assert len(fake.procs) == 1  # b and c wait their turn
    vt.advance(1.0)              # a is idle: stopped; b (queued first) starts, c waits
    b = spawned(fake, 2)
    assert "b.stp" in " ".join(b.argv)
    assert manager.get("b.stp").state == "starting" and manager.get("c.stp").queued
    vt.advance(0.5)              # 2 s after b's request, 0.5 s after its start
    assert not [sig for pid, sig in fake.signals if pid == b.pid]
    assert manager.shutdown(timeout=SETTLE)
    assert not manager.get("c.stp").queued and len(fake.procs) == 2


# -- honest states: running once the output exists, refused, backoff -----


class Sessions:
    """The manager as the self-metrics collector sees it."""

    def __init__(self, *sessions):
        self.sessions = sessions

    def all(self):
        return list(self.sessions)


def self_metrics(session):
    """{(name, labels): value} of the per-script lifecycle metrics of SESSION."""
    from stapexporter_lib.web.selfmetrics import SessionCollector
    samples = {}
    for family in SessionCollector(Sessions(session), proc="/nonexistent")._lifecycle([session]):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def state_gauges(session):
    return {labels[1][1]: value for (name, labels), value in self_metrics(session).items()
            if name == "stap_exporter_script_state"}


def write_output(procfs_dir, session, text=b"up 1\n"):
    module_dir = procfs_dir / session.script.module
    module_dir.mkdir(exist_ok=True)
    (module_dir / "__prometheus").write_bytes(text)
    return module_dir


def test_output_appearing_unread_makes_the_script_running_and_up(world):
    make, vt, fake, procfs_dir = world
    s = make("count-autostart.stp")
    s.start()
    spawned(fake, 1)
    vt.advance(5)
    assert s.state == "starting" and s.first_output_at is None
    assert self_metrics(s)[("stap_exporter_script_up", (("script", s.name),))] == 0
    write_output(procfs_dir, s)
    vt.advance(0.1)
    assert s.state == "starting"  # looked for every 0.2 s, not more often
    vt.advance(0.1)
    settle(lambda: s.state == "running", "running without a scrape")
    assert s.first_output_at - s.started_at == pytest.approx(5.2)
    metrics = self_metrics(s)
    assert metrics[("stap_exporter_script_up", (("script", s.name),))] == 1
    assert metrics[("stap_exporter_script_output_read", (("script", s.name),))] == 0
    gauges = state_gauges(s)
    assert gauges.pop("running") == 1 and set(gauges.values()) == {0}
    assert set(gauges) == {"stopped", "starting", "stopping", "backoff", "failed", "refused"}
    assert s.scrape(5).kind == Outcome.OK
    assert self_metrics(s)[("stap_exporter_script_output_read", (("script", s.name),))] == 1


def test_output_is_looked_for_often_right_after_a_spawn(world):
    """A loader makes its output within milliseconds of its spawn: the
    watchdog looks every 2.5 ms at first, then less often as a compile goes
    on (a quarter of the time since the spawn), at most every 0.2 s."""
    from stapexporter_lib.scripts.session import output_poll_interval
    make, vt, fake, procfs_dir = world
    s = make("quick-autostart.stp")
    s.start()
    spawned(fake, 1)
    vt.advance(0.0025)
    assert s.state == "starting"
    write_output(procfs_dir, s)
    vt.advance(0.0025)
    settle(lambda: s.state == "running", "running 2.5 ms after the output appeared")
    assert [output_poll_interval(t) for t in (0, 0.004, 0.02, 0.1, 0.4, 0.8, 60)] == \
        pytest.approx([0.0025, 0.0025, 0.005, 0.025, 0.1, 0.2, 0.2])


def test_an_untrusted_script_file_is_refused_until_fixed(world):
    make, vt, fake, _ = world
    s = make()
    os.chmod(s.script.path, 0o666)
    outcome = s.scrape(5)
    assert outcome.kind == Outcome.FORBIDDEN and s.state == "refused"
    assert "writable by group and others (mode 0666)" in s.last_error
    assert state_gauges(s)["refused"] == 1 and not fake.procs and not s.live
    os.chmod(s.script.path, 0o644)
    assert s.script_refusal() is None  # what the index does: the state says so
    assert s.state == "stopped" and s.last_error is None
    os.chmod(s.script.path, 0o646)
    s.script_refusal()
    assert s.state == "refused"
    os.chmod(s.script.path, 0o644)
    scrape = gevent.spawn(s.scrape, 5)  # the next request checks again, and starts it
    spawned(fake, 1)
    vt.advance(1)
    assert scrape.get(timeout=SETTLE).kind == Outcome.NOT_READY and s.state == "starting"


def refused_autostart(make):
    """An autostart session whose file is group-writable, started: REFUSED."""
    s = make("x-autostart.stp")
    os.chmod(s.script.path, 0o664)
    s.start()
    settle(lambda: s.state == "refused", "refused")
    return s


def test_a_refused_autostart_script_is_checked_again_on_the_backoff_schedule(world):
    make, vt, fake, _ = world
    s = refused_autostart(make)
    assert s.live and s.retry_in() == 1 and not fake.procs
    assert "writable by group" in s.last_error
    vt.advance(1)
    settle(lambda: s.retry_in() == 2, "second check")
    assert s.state == "refused" and s.restarts == 0 and not s.exits
    os.chmod(s.script.path, 0o644)
    vt.advance(2)
    spawned(fake, 1)
    assert s.state == "starting" and s.last_error is None


def test_a_request_for_a_fixed_autostart_script_starts_it_at_once(world):
    make, vt, fake, _ = world
    s = refused_autostart(make)
    assert s.scrape(5).kind == Outcome.FORBIDDEN
    os.chmod(s.script.path, 0o644)
    assert s.scrape(5).kind == Outcome.NOT_READY
    spawned(fake, 1)  # no clock advance: the wait ended at once


def test_an_untrusted_output_is_refused_while_the_process_runs_on(world, tmp_path):
    make, vt, fake, procfs_dir = world
    s = make("y-autostart.stp")
    s.start()
    proc = spawned(fake, 1)
    module_dir = procfs_dir / s.script.module
    module_dir.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("secret 1\n")
    os.symlink(str(secret), str(module_dir / "__prometheus"))
    vt.advance(0.2)
    settle(lambda: s.state == "refused", "refused output")
    assert s.pid == proc.pid and "__prometheus is a symbolic link" in s.last_error
    assert self_metrics(s)[("stap_exporter_script_up", (("script", s.name),))] == 0
    outcome = s.scrape(5)
    assert outcome.kind == Outcome.UNTRUSTED and b"secret" not in outcome.body
    os.unlink(str(module_dir / "__prometheus"))
    write_output(procfs_dir, s)
    vt.advance(0.2)
    settle(lambda: s.state == "running", "running again")
    assert s.last_error is None and not fake.signals


def test_a_crashing_autostart_script_shows_backoff_with_its_reason(world):
    s = crashed_autostart(world, 2)
    assert s.last_error == "exit status 2" and s.retry_in() == 1
    assert state_gauges(s)["backoff"] == 1
    from stapexporter_lib.web import indexpage
    row = indexpage.ScriptRow(s.name, s.state, s.pid, s.uptime(), s.starts, None,
                              s.last_output_bytes, s.output_read, None, None, s.last_error,
                              [], s.retry_in())
    assert indexpage.reason(row) == "exit status 2 (restarting in 1s)"


def test_a_stale_untrusted_output_before_the_spawn_does_not_refuse_the_start(world, tmp_path):
    make, vt, fake, procfs_dir = world
    s = make()
    module_dir = procfs_dir / s.script.module
    module_dir.mkdir()
    os.symlink(str(tmp_path / "elsewhere"), str(module_dir / "__prometheus"))
    scrape = gevent.spawn(s.scrape, 5)
    spawned(fake, 1)  # the spawn removes what an earlier run left
    vt.advance(1)
    assert scrape.get(timeout=SETTLE).kind in (Outcome.UNTRUSTED, Outcome.NOT_READY)
    assert s.state == "starting" and s.pid == fake.last.pid
    assert not module_dir.exists()


def test_start_time_counts_from_before_the_spawn(world):
    """A spawn yields to the hub until the child has exec'd (gevent's Popen
    reads its error pipe), which takes a while on a busy exporter: the start
    time covers it, so a loader whose output is ready right after the exec
    does not show a start of nothing."""
    from stapexporter_lib.web.selfmetrics import start_seconds
    make, vt, fake, procfs_dir = world

    def slow_popen(argv, **kwargs):
        vt.now += 0.05  # the exec took 50 ms of the exporter's time
        return fake.popen(argv, **kwargs)
    s = make("quick-autostart.stp", popen=slow_popen)
    s.start()
    spawned(fake, 1)
    write_output(procfs_dir, s)
    vt.advance(0.01)
    settle(lambda: s.state == "running", "running")
    assert start_seconds(s) == pytest.approx(0.06)


def test_an_output_over_the_series_limit_is_refused_naming_both_numbers(world, caplog):
    make, vt, fake, procfs_dir = world
    s = make("wide-autostart.stp")
    with open(s.script.path, "w") as f:
        f.write("# stap-exporter: max-series=2\nprobe begin {}\n")
    s.start()
    spawned(fake, 1)
    key = (("script", s.name),)
    assert self_metrics(s)[("stap_exporter_script_series_limit", key)] == 2
    write_output(procfs_dir, s, b"# HELP a x\na 1\nb 2\nc 3\n")
    with caplog.at_level(logging.INFO, logger="stap-exporter"):
        for _ in range(3):
            outcome = s.scrape(5)
            assert outcome.kind == Outcome.SERIES_LIMIT and not outcome.body
            assert outcome.message == ("The script's output has 3 series, more than the limit"
                                       " of 2.")
        assert caplog.text.count("series-limit:") == 1  # logged once while it lasts
        assert self_metrics(s)[("stap_exporter_script_series", key)] == 3
        write_output(procfs_dir, s, b"a 1\nb 2\n")
        outcome = s.scrape(5)
        assert (outcome.kind, outcome.body) == (Outcome.OK, b"a 1\nb 2\n")
        assert "output of 2 series is within the limit again" in caplog.text
        assert self_metrics(s)[("stap_exporter_script_series", key)] == 2
        write_output(procfs_dir, s, b"a 1\nb 2\nc 3\nd 4\n")
        assert s.scrape(5).kind == Outcome.SERIES_LIMIT
        assert caplog.text.count("is over the limit of 2") == 2  # over again: logged again


def test_without_a_series_limit_none_is_published_and_every_output_is_served(world):
    make, vt, fake, procfs_dir = world
    s = make("wide-autostart.stp")
    s.start()
    spawned(fake, 1)
    write_output(procfs_dir, s, b"a 1\nb 2\nc 3\n")
    assert s.scrape(5).kind == Outcome.OK
    assert ("stap_exporter_script_series_limit", (("script", s.name),)) not in self_metrics(s)
