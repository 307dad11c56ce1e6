"""One script's lifecycle: the state machine and its policy -- when to start,
stop, back off and restart a script's process.

``Lifecycle`` (the base of ``session.Session``, built on
``scriptstate.ScriptState``) owns at most one ``child.ChildRun`` at a time.
Every state change goes through ``_transition``, which checks it against
``states.TRANSITIONS``.  One watchdog greenlet per live script waits for
whichever comes first -- the child's exit, the keepalive deadline, or a stop
request -- and acts on it; while the script starts it also looks for the
output, often right after a spawn and then less (``scriptstate.
output_poll_interval``): a script is ``running`` once its output exists,
read or not.  It sleeps through an autostart script's backoff
(or the wait before its refused file is checked again) and restarts it.  What
a start runs comes from ``launch.Launch``; each run's output location is
reset on the ``reader.OutputReader``.

The clock, the waits, the process launcher and the group signal are
injectable, so tests drive the state machine with a fake clock and a fake
process.

Owns the process policy, the counters, the timing and the watchdog.  Must not know
about HTTP or answer scrapes (``session.py``), fork or signal processes itself
(``child.py``), or read output files (``reader.py``/``procfs.py``).
"""

import collections
import dataclasses
import logging
import os
import signal
import time
from typing import Callable, Deque, List, Optional

import gevent
from gevent import subprocess

from . import trust
from .catalog import Script
from .child import (ChildRun, Seams, Waiter, remove_module_dirs,
                    stop_budget, wait_any)
from .launch import LOAD, Launch
from .scriptstate import ScriptState, output_poll_interval
from .states import (BACKOFF, FAILED, OUTPUT_PENDING_STATES, REFUSED, STARTABLE_STATES, STARTING,
                     STOPPED, STOPPING)

log = logging.getLogger("stap-exporter")

# Lines of a script's standard error kept for error pages and the index.
STDERR_TAIL = 20

# Backoff for autostart scripts that exit: 1 s doubling to 60 s, back to 1 s
# once a run has lasted BACKOFF_RESET seconds.
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0
BACKOFF_RESET = 30.0


@dataclasses.dataclass
class SessionConfig:
    """What a session needs from the exporter's configuration (built by
    ``server.Exporter`` from ``cli.Config``; no defaults of its own)."""

    stap: List[str]
    procfs_dirs: List[str]
    keepalive: Optional[float]
    start_wait: float
    stop_grace: float
    workdir_root: str
    max_output: int
    direct_load: object  # launch.DirectLoad, or None: plain scripts run through the driver
    insecure_scripts: bool  # skip the script trust checks (--insecure-scripts)


class Backoff:
    """When an autostart script that exited is restarted (the delays above)."""

    def __init__(self):
        self._next = BACKOFF_FIRST

    def reset(self) -> None:
        self._next = BACKOFF_FIRST

    def delay(self, uptime: float) -> float:
        """The delay before the restart after a run of UPTIME seconds."""
        if uptime >= BACKOFF_RESET:
            self._next = BACKOFF_FIRST
        delay = self._next
        self._next = min(self._next * 2, BACKOFF_CAP)
        return delay


def describe_exit(returncode: Optional[int]) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal %d" % -returncode
        return "killed by %s" % name
    return "exit status %d" % returncode


class Lifecycle(ScriptState):
    """The process side of one script's session: its state, its runs, and the
    watchdog that moves it from state to state."""

    def __init__(self, script: Script, config: SessionConfig,
                 clock: Callable[[], float] = time.monotonic,
                 popen=subprocess.Popen, wait: Waiter = wait_any,
                 killpg: Callable[[int, int], None] = os.killpg,
                 kill: Callable[[int, int], None] = os.kill,
                 start_over: Callable[[], None] = lambda: None):
        super().__init__(script, config, clock)
        self._start_over = start_over  # called whenever a start ends
        self._os = Seams(clock=clock, wait=wait, popen=popen, killpg=killpg, kill=kill)
        self.starts = 0
        self.restarts = 0
        self.exits = collections.Counter()  # outcome -> count
        self.stderr_tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.last_request = clock()
        self.requests_in_flight = 0  # scrapes under way: the script is not idle meanwhile
        self._backoff = Backoff()
        self._stop_requested = False
        self._launch = Launch(script, config.stap, config.direct_load)

    def touch(self) -> None:
        """A request arrived: reset the keepalive clock."""
        self.last_request = self.clock()

    def start(self) -> None:
        """Start the script if it is stopped (or failed); otherwise nothing.
        The process is spawned by the session's watchdog greenlet."""
        if self.state not in STARTABLE_STATES or self.live:
            return
        self._stop_requested = False
        self._backoff.reset()
        self._launch.from_cache = False  # counted as compiling until its first step is known
        self._transition(STARTING)
        self._watchdog = gevent.spawn(self._watch)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the script (SIGTERM, then SIGKILL after the grace) and wait
        for it, at most TIMEOUT seconds (default: the stop budget)."""
        watchdog = self._watchdog
        if watchdog is None:
            return
        self._stop_requested = True
        self._wake.set()
        watchdog.join(timeout if timeout is not None else self.stop_budget())

    @property
    def compiling(self) -> bool:
        """A start that compiles, until its output appears (the load after
        its compile included: the CPU is shared best by fewer starts at
        once), or that runs stap or a wrapper: what --max-starting counts.
        Not a start that loads a kept module, which costs next to nothing."""
        return self.state == STARTING and not self._launch.from_cache

    def stop_budget(self) -> float:
        """The longest a stop can take (see ``child.stop_budget``)."""
        return stop_budget(self.config.stop_grace)

    def _transition(self, new: str) -> None:
        ending_start = self.state == STARTING and new != STARTING
        super()._transition(new)
        if ending_start:
            self._start_over()

    # -- in the watchdog greenlet -------------------------------------------

    def _spawn(self) -> None:
        """Fork the next process of a STARTING session (a start's first, or the
        loader after a compile).  If it cannot: FAILED (BACKOFF if autostart)."""
        self._reader.new_run()
        self._produced = False
        self.stderr_tail.clear()
        # Loading what this start's compile just made: the script file is not
        # read or run again, so it needs no new check.
        loading = self._launch.compiled_pending()
        if not loading and self._refused_to_spawn():
            return
        # A stale FIFO from an earlier run that died unseen would be read
        # instead of the new one (and never answer): start from a clean slate.
        for directory in remove_module_dirs(self.script.module, self.config.procfs_dirs):
            log.warning("stale: script=%s removed %s left by an earlier run", self.name,
                        directory)
        self._reader.annotator = self._launch.read_script()
        step = self._launch.next_step()
        run = ChildRun(self.script, self.stderr_tail, self._os, step.kind, step.chained)
        # Checked again right before the exec: the file is run by name.
        if not (loading and step.kind == LOAD) and self._refused_to_spawn():
            step.discard()
            return
        began = self.clock()  # the spawn yields to the hub until the exec
        try:
            run.spawn(step.argv, self.config.workdir_root, step.workdir, step.prepare)
        except (OSError, trust.Untrusted) as exc:
            message = self._launch.spawn_error(step.argv, exc)
            if message:  # else a kept module is forgotten: the watchdog compiles next
                self._spawn_failed(message)
            return
        self._run = run
        run.watch = self._launch.watch_compile(run)
        if not step.continues:
            self.started_at = began
            self.starts += 1
        self.last_error = None
        step.log_spawn(self.script, run.pid)

    def _refused_to_spawn(self) -> bool:
        """True (and the session REFUSED) if the script file is not trusted.
        An autostart script has it checked again after the backoff delay; an
        on-demand one by the next request."""
        refusal = self.script_refusal()
        if refusal:
            self._launch.abandon()
            self.note_refusal(refusal)
            self.backoff_until = None
            if self.script.autostart and not self._stop_requested:
                self.backoff_until = self.clock() + self._backoff.delay(0.0)
                log.debug("refused: script=%s checking the file again in %.0f s", self.name,
                          self.backoff_until - self.clock())
            self._transition(REFUSED)
        return bool(refusal)

    def _spawn_failed(self, message: str) -> None:
        self.last_error = message
        self.stderr_tail.append(message)
        self.exits["spawn_error"] += 1
        self._after_exit(uptime=0.0)

    def _watch(self) -> None:
        try:
            while True:
                if self.state in (BACKOFF, REFUSED) and self._run is None:
                    if not self._wait_retry():
                        return
                if self.state == STARTING and self._run is None:
                    self._spawn()
                    continue
                if self._run is None or not self.serving:
                    return
                event = self._wait_live()
                if event == "exit":
                    self._handle_exit()
                elif event == "compiled":  # its shell became the loader; still STARTING
                    self._launch.load_in_place(self._run)
                    self._run.become(LOAD)
                else:
                    self._terminate(event)
        except BaseException:
            log.exception("watchdog-crashed: script=%s", self.name)
            if self._run is not None:
                self._run.signal_group(signal.SIGKILL)
            raise
        finally:
            self._watchdog = None
            self._wake.clear()

    def _wait_retry(self) -> bool:
        """Wait out a BACKOFF (or an autostart script's REFUSED file), then
        STARTING; False if the watchdog ends instead (a stop came first, or
        an on-demand script's refusal waits for the next request)."""
        if self.state == REFUSED and self.backoff_until is None:
            return False
        if self._sleep_backoff():
            self._transition(STOPPED)
            return False
        if self.state == BACKOFF:
            self.restarts += 1  # a refused file's new check is no restart
        self._transition(STARTING)
        return True

    def _wait_live(self) -> str:
        """Block until the process exits ("exit"), a stop is requested
        ("stop"), the keepalive period passes without requests ("idle"), or
        a chained compile has become the loader ("compiled").
        Until the output appears (or while it is refused), look for it
        (``output_poll_interval``)."""
        keepalive = self.config.keepalive
        while True:
            if self._stop_requested:
                return "stop"
            timeout = None
            if keepalive is not None and not self.script.autostart:
                timeout = keepalive if self.requests_in_flight else \
                    self.last_request + keepalive - self.clock()
                if timeout <= 0:
                    return "idle"
            if self.state in OUTPUT_PENDING_STATES:
                self._look_for_output()
            if self._launch.compiled_early(self._run, self._run.watch):
                return "compiled"
            if self.state in OUTPUT_PENDING_STATES:
                poll = output_poll_interval(self.clock() - self._run.spawned_at)
                timeout = poll if timeout is None else min(timeout, poll)
            watch = self._run.watch
            self._os.wait([self._run.result, self._wake] + ([watch.event] if watch else []),
                          timeout)
            if self._run.exited() and not self._stop_requested:
                # A chain that became the loader and ended before we saw it.
                return "compiled" if self._launch.compiled_early(self._run, None) else "exit"
            self._wake.clear()
            if watch:
                watch.event.clear()

    def _sleep_backoff(self) -> bool:
        """Sleep until the backoff ends; True if a stop came first."""
        while not self._stop_requested:
            remaining = (self.backoff_until or 0) - self.clock()
            if remaining <= 0:
                return False
            self._os.wait([self._wake], remaining)
            self._wake.clear()
        return True

    def _handle_exit(self) -> None:
        run = self._run
        uptime = self.clock() - (self.started_at or self.clock())
        if not self._stop_requested and self._launch.take_compiled(run):
            self._end_run()
            return  # still STARTING: the watchdog spawns the loader
        if (run.kind == LOAD and not self._launch.from_cache and not self._produced
                and not self._stop_requested and self._launch.fall_back_to_driver(run)):
            self._end_run()
            return  # still STARTING: the watchdog runs the stap driver next
        if self._launch.from_cache and not self._produced and not self._stop_requested:
            # The kept module would not run (a changed kernel or runtime, say):
            # forget it and compile afresh, without bothering the client.
            log.warning("cache: script=%s pid=%d compiled module failed (%s); recompiling",
                        self.name, run.pid, describe_exit(run.returncode))
            self._launch.drop_kept()
            self._end_run()
            return  # still STARTING: the watchdog spawns the full compile
        self._end_run()
        self.last_error = describe_exit(run.returncode)
        self.exits["error" if run.returncode != 0 else "exited"] += 1
        log.warning("exited: script=%s pid=%d (%s; not expected)", self.name, run.pid,
                    self.last_error)
        self._after_exit(uptime)

    def _after_exit(self, uptime: float) -> None:
        if self.script.autostart and not self._stop_requested:
            delay = self._backoff.delay(uptime)
            self.backoff_until = self.clock() + delay
            log.info("backoff: script=%s restarting in %.0f s after %s", self.name, delay,
                     self.last_error)
            self._transition(BACKOFF)
        else:
            self._transition(FAILED)

    def _terminate(self, reason: str) -> None:
        run = self._run
        self._transition(STOPPING)
        log.info("stopping: script=%s pid=%d reason=%s", self.name, run.pid,
                 "idle for %gs" % self.config.keepalive if reason == "idle" else reason)
        run.terminate(self.config.stop_grace)
        self._end_run()
        self.exits["stopped"] += 1
        log.info("stopped: script=%s pid=%d (%s)", self.name, run.pid,
                 describe_exit(run.returncode))
        self._transition(STOPPED)

    def _end_run(self) -> None:
        """What every end of a run needs, whatever ended it: drain the output
        pumps, stop what is left of the process group, remove the run's files
        (the working directory unless a compile handed it over, and any
        module directory the runtime failed to remove, like the BPF runtime's
        FIFO directory after a SIGKILL), and forget the process."""
        run = self._run
        run.reap(self.config.stop_grace)
        if run.workdir:
            self._launch.keep_compiled(leaving=run.workdir)
        run.remove_workdir()
        remove_module_dirs(self.script.module, self.config.procfs_dirs)
        self._reader.path = None
        self._run = None

    def _tail_text(self) -> str:
        return "\n".join(self.stderr_tail)
