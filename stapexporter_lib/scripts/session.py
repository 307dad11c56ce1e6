"""One script: its state, its processes, and the answers to requests for it.

A ``Session`` is to one script what Supervisor's ``Subprocess`` is to one
program.  Every state change goes through ``_transition``, checked against
``states.TRANSITIONS``.  A start is one greenlet (the watchdog) running
straight-line code: read the script file once through trusted descriptors
and copy those bytes into a private working directory; then a kept module is
loaded, or the copy is compiled (``stap -p4``) and its module loaded (a
--max-starting slot is held from the compile until the output appears), or
an executable script (or a script the loader cannot run alone) runs as it
is; then the session serves until the process exits, the keepalive passes
without requests, or a stop is asked for; an autostart script that exits is
restarted after a backoff.  While it serves, an edit of the file starts the
new version beside the running one, the same way, under a module name of its
own; once the new version's output appears it takes over and the old one
stops (``_try_edit``).  The file's own settings (``settings.py``) override
the command line's.

Requests get an ``Outcome``, never HTTP (``web/app.py`` maps outcomes to
status codes).  The clock, the waits, the process launcher and the signals
are injectable, so tests drive a session with a fake clock and fake
processes.
"""

import bisect
import collections
import contextlib
import itertools
import logging
import math
import os
import signal
import stat
import tempfile
import time
from typing import Callable, Deque, List, NamedTuple, Optional, Tuple

import gevent
import gevent.event
from gevent import subprocess

from .. import trust
from ..logs import escape_line
from ..offhub import in_pool
from ..states import (BACKOFF, FAILED, OUTPUT_PENDING_STATES, REFUSED, RUNNING, SERVING_STATES,
                      STARTABLE_STATES, STARTING, STOPPED, STOPPING, TRANSITIONS)
from . import build, naming, output
from .catalog import Script
from .declarations import Annotator, parse_declarations
from .process import Process, Seams, Waiter, remove_module_dirs, rmtree, stop_budget, wait_any
from .settings import Settings, SettingsError, describe as describe_settings, \
    parse as parse_settings

log = logging.getLogger("stap-exporter")

# Lines of a script's standard error kept for error pages and the index.
STDERR_TAIL = 20

# Backoff for autostart scripts that exit: 1 s doubling to 60 s, back to 1 s
# once a run has lasted BACKOFF_RESET seconds.
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0
BACKOFF_RESET = 30.0

# The longest a request that finds its script starting waits for output.
START_WAIT = 1.0
# While a request waits for a starting script, how often it looks for the
# output (it also wakes at once when the state changes).
LOCATE_INTERVAL = 0.05

# Retry-After (seconds) of answers that are not the output.
RETRY_BUSY = 5           # --max-scripts refused the start
RETRY_QUEUED = 2         # the start waits its turn (--max-starting)
RETRY_STOPPING = 1       # stopping: the next request starts it again
RETRY_STARTING = 2       # starting (compiling)
RETRY_UNAVAILABLE = 1    # running, but the output could not be read
RETRY_MIN = 1            # the least Retry-After a backoff answer gives

# While a script starts (or its output is refused), how often the watchdog
# looks for its output (metadata only, nothing is opened): often right after
# a spawn (a loader makes its output within milliseconds), then a quarter of
# the time since the spawn, up to OUTPUT_POLL_INTERVAL (a compile takes a
# while).
OUTPUT_POLL_FIRST = 0.0025
OUTPUT_POLL_INTERVAL = 0.2

# How a script trust refusal starts (to know when one is fixed), and how many
# distinct refusals a session remembers (each is logged once).
SCRIPT_REFUSAL = "refused to run "
MAX_REFUSALS_REMEMBERED = 64

# How long a version that was taken over keeps serving the reads under way
# before it is stopped.
READS_DRAIN = 5.0

# The kinds of process a start runs (the log's run= field).
WRAPPER = "wrapper"   # an executable script, as it is
DRIVER = "driver"     # STAP -m MODULE FILE
COMPILE = "compile"   # STAP -p4 -m MODULE FILE
LOAD = "load"         # the loader alone, on the compiled module

# Why a wait ended.  ENDED: the running version exited while an edit's
# version started beside it.
EXIT, STOP, IDLE, OUTPUT, EDITED, ENDED = "exit", "stop", "idle", "output", "edited", "ended"


class SessionConfig(NamedTuple):
    """What a session needs from the exporter's configuration (built by
    ``server.Exporter`` from ``cli.Config``; no defaults of its own)."""

    stap: List[str]
    procfs_dirs: List[str]
    keepalive: Optional[float]
    start_wait: float
    stop_grace: float
    workdir_root: str
    max_output: int
    plan: Optional[build.Plan]          # None: plain scripts run through the stap driver
    cache: Optional[build.ModuleCache]  # compiled modules kept (None: none)
    insecure_scripts: bool              # skip the script trust checks (--insecure-scripts)
    max_series: Optional[int]           # --max-series (None: no limit)


class Outcome:
    """What a scrape produced.  KIND is one of the constants below."""

    OK = "ok"                # BODY is the script's output
    NOT_READY = "not_ready"  # starting, restarting or stopping: try again soon
    FAILED = "failed"        # the script exited with an error: MESSAGE says why
    UNAVAILABLE = "unavailable"  # running, but its output could not be read
    BUSY = "busy"            # not started: a cap on running or starting scripts
    SERIES_LIMIT = "series_limit"  # the output holds more samples than the limit
    # Refusals (trust.py): MESSAGE names the path and the reason.
    UNTRUSTED = "untrusted_output"  # the output path is not trusted: nothing read
    FORBIDDEN = "untrusted_script"  # the script file is not trusted: not started
    BAD_SETTINGS = "bad_settings"   # a setting in the file is wrong: not started

    __slots__ = ("kind", "body", "message", "retry_after")

    def __init__(self, kind: str, body: bytes = b"", message: str = "",
                 retry_after: Optional[float] = None):
        self.kind = kind
        self.body = body
        self.message = message
        self.retry_after = retry_after

    def __repr__(self):
        return "Outcome(%s, %r)" % (self.kind, self.message or self.body[:40])


def not_ready(message: str, retry_after: float) -> Outcome:
    return Outcome(Outcome.NOT_READY, message=message, retry_after=retry_after)


def unavailable(message: str) -> Outcome:
    return Outcome(Outcome.UNAVAILABLE, message=message, retry_after=RETRY_UNAVAILABLE)


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


def output_poll_interval(since_spawn: float) -> float:
    """How long the watchdog waits before it looks for the output again,
    SINCE_SPAWN seconds after the process was spawned."""
    return min(OUTPUT_POLL_INTERVAL, max(OUTPUT_POLL_FIRST, since_spawn / 4))


def file_identity(st: os.stat_result) -> tuple:
    """What tells one version of a file from the next: the inode (a rename
    into place is a new one), the size and the change times."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _StartEnded(Exception):
    """A start ends before its script runs: it was refused (the state is
    set), or a stop was asked for."""


class _SpawnFailed(Exception):
    """A process of a start could not be forked (the message says why)."""


class _Run:
    """One version of the script as a start runs it: the module name it runs
    as, its private working directory, the process of the moment (a compile,
    then the loader) and its output."""

    def __init__(self, name: str, module: str, config: SessionConfig,
                 clock: Callable[[], float]):
        self.module = module
        self.reader = output.OutputReader(name, module, config.procfs_dirs, config.max_output,
                                          clock)
        self.tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL)  # its standard error
        self.workdir: Optional[str] = None
        self.proc: Optional[Process] = None
        self.produced = False               # its output has appeared (and was trusted)
        self.began: Optional[float] = None  # clock() as its first process was spawned
        self.digest: Optional[str] = None   # of the bytes it runs

    @property
    def output_expected(self) -> bool:
        """Whether a process that writes the output runs: what the module
        path holds during a compile is no output of this start (the spawn of
        the loader clears what it can)."""
        return self.proc is not None and self.proc.kind != COMPILE


class Session:
    """One script: its lifecycle and the answers to requests for it."""

    def __init__(self, script: Script, config: SessionConfig,
                 clock: Callable[[], float] = time.monotonic,
                 popen=subprocess.Popen, wait: Waiter = wait_any,
                 killpg: Callable[[int, int], None] = os.killpg,
                 kill: Callable[[int, int], None] = os.kill,
                 admit: Optional[Callable[["Session"], Optional[str]]] = None,
                 start_slots: Optional["StartSlots"] = None):
        self.script = script
        self.config = config
        self.clock = clock
        self._os = Seams(clock=clock, wait=wait, popen=popen, killpg=killpg, kill=kill)
        self._admit = admit
        self._start_slots = start_slots or StartSlots(None)  # --max-starting, shared
        self.state = STOPPED
        self.last_error: Optional[str] = None
        self.started_at: Optional[float] = None       # clock() as the last start's spawn began
        self.first_output_at: Optional[float] = None  # clock() of the last start's first output
        self.backoff_until: Optional[float] = None
        self.starts = 0
        self.restarts = 0
        self.exits = collections.Counter()  # outcome -> count
        self.last_request = clock()
        self.requests_in_flight = 0  # scrapes under way: the script is not idle meanwhile
        self.queued = False          # the start waits for a --max-starting slot
        self.ticket = 0              # the start's place in line for a slot
        self.settings = Settings()   # the file's: the running version's, or as last read
        self.settings_error: Optional[str] = None  # why the file's settings refuse it
        self.version = 0             # edits that took over
        self.edit_error: Optional[str] = None  # why the last edit did not take over
        self.edit_stderr: List[str] = []       # and its last lines of standard error
        self.edit_failures = 0
        self._run = _Run(script.name, script.module, config, clock)
        self._next: Optional[_Run] = None  # an edit's version while it starts beside _run
        self._file_id: Optional[tuple] = None  # the file as last read (file_identity)
        self._edited = False         # it changed since: a running script tries the new version
        self._watchdog: Optional[gevent.Greenlet] = None
        self._stop_requested = False
        self._wake = gevent.event.Event()
        self._changed = gevent.event.Event()
        self._backoff = Backoff()
        self._refusals_logged = set()  # trust refusals logged (once per cause)
        self._driver_reason: Optional[str] = None  # why this script now runs the driver way
        self._over_limit = False               # the last output read was over it (logged)

    # -- what the index page and the self-metrics read ----------------------

    @property
    def name(self) -> str:
        return self.script.name

    @property
    def pid(self) -> Optional[int]:
        return self._run.proc.pid if self._run.proc is not None else None

    @property
    def module(self) -> str:
        """The module name the current version runs as."""
        return self._run.module

    @property
    def stderr_tail(self) -> Deque[str]:
        """The current version's last lines of standard error."""
        return self._run.tail

    @property
    def last_output_bytes(self) -> int:
        return self._run.reader.last_output_bytes

    @property
    def last_series(self) -> int:
        return self._run.reader.last_series

    @property
    def max_series(self) -> Optional[int]:
        """The most samples an output served may hold (None: no limit): as
        the file sets it, else --max-series."""
        own = self.settings.max_series
        return self.config.max_series if own is None else own

    @property
    def output_read(self) -> bool:
        """True once the current run's output has been read."""
        return self._run.reader.read_this_run

    @property
    def serving(self) -> bool:
        """True while a process runs whose output a request may be answered
        from (a refused output is checked again)."""
        return self.state in SERVING_STATES and (self.state != REFUSED
                                                 or self._run.proc is not None)

    @property
    def autostart(self) -> bool:
        """Started with the exporter and restarted when it exits: as the
        file sets it, else when the name contains ``autostart``."""
        own = self.settings.autostart
        return self.script.autostart if own is None else own

    @property
    def keepalive(self) -> Optional[float]:
        """Seconds without requests after which the script stops (None:
        never): as the file sets it, else --keepalive, which autostart
        scripts are exempt from."""
        own = self.settings.keepalive
        if own is not None:
            return None if own == math.inf else own
        return None if self.autostart else self.config.keepalive

    def settings_text(self, scrape_timeout: float) -> str:
        """The settings in effect, as a file would write them; SCRAPE_TIMEOUT
        is --scrape-timeout."""
        own = self.settings
        return describe_settings(self.keepalive, self.autostart,
                                 own.scrape_timeout or scrape_timeout, self.max_series)

    @property
    def live(self) -> bool:
        """True while a start, a process or a restart is under way."""
        return self._watchdog is not None

    def uptime(self) -> Optional[float]:
        if self.serving and self._run.proc is not None and self.started_at is not None:
            return self.clock() - self.started_at
        return None

    def retry_in(self) -> Optional[float]:
        """Seconds until the watchdog restarts the script (backoff) or checks
        its refused file again (autostart); None when it does not wait."""
        if self.state in (BACKOFF, REFUSED) and self._run.proc is None and self.live \
                and self.backoff_until is not None:
            return max(0.0, self.backoff_until - self.clock())
        return None

    def stop_budget(self) -> float:
        """The longest a stop can take (``process.stop_budget``; twice that
        while an edit's version starts: it stops first)."""
        return stop_budget(self.config.stop_grace) * (2 if self._next is not None else 1)

    # -- control ---------------------------------------------------------------

    def touch(self) -> None:
        """A request arrived: reset the keepalive clock."""
        self.last_request = self.clock()

    def start(self) -> None:
        """Start the script if it is not under way; the watchdog greenlet
        does the work."""
        if self.state not in STARTABLE_STATES or self.live:
            return
        self._stop_requested = False
        self._backoff.reset()
        self.ticket = self._start_slots.ticket()
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

    def retry_now(self) -> None:
        """End the watchdog's wait at once (a request found the refused
        file of an autostart script fixed)."""
        self.backoff_until = self.clock()
        self._wake.set()

    def script_refusal(self) -> Optional[str]:
        """None if the script file may run as root now and its settings are
        right, else why not.  Shown as the last error while it lasts; a
        session without a process turns REFUSED while it lasts and STOPPED
        once fixed."""
        refusal = None
        if not self.config.insecure_scripts:
            refusal = trust.script_refusal(self.script.path)
            refusal = refusal and "%s%s: %s" % (SCRIPT_REFUSAL, self.name, refusal)
        refusal = refusal or self.settings_error
        idle = not self.live
        if refusal:
            self.last_error = refusal
            if idle and self.state in (STOPPED, FAILED):
                self._transition(REFUSED)
            return refusal
        if self.last_error and self.last_error.startswith(SCRIPT_REFUSAL):
            self.last_error = None  # fixed since
        if idle and self.state == REFUSED:
            self._transition(STOPPED)
        return None

    def file_changed(self, identity: Optional[tuple]) -> bool:
        """The manager looked at the file: IDENTITY (``file_identity``, None
        when it could not).  True if it changed since it was last read; a
        running script then tries its new version, an autostart script
        waiting to check its refused file again checks it now."""
        if identity is None or identity == self._file_id:
            return False
        if self.live and not self._edited:
            self._edited = True
            if self.state == REFUSED and self._run.proc is None:
                self.retry_now()
            else:
                self._wake.set()
        return True

    def read_settings(self, identity: tuple) -> None:
        """Read the settings of the file of a script that does not run (the
        manager does, when it changed): for the index page, autostart, and
        the refusal of a wrong setting.  IDENTITY: the file as the manager
        saw it."""
        try:
            source, st = in_pool(trust.read_script, self.script.path,
                                 not self.config.insecure_scripts)
        except (trust.Untrusted, OSError):
            self._file_id = identity  # script_refusal() says why, when asked
            return
        if self.live:
            return  # a start read it meanwhile: its reading counts
        self._file_id = file_identity(st)
        self.settings = self._parse_settings(source) or self.settings
        if self.settings_error:
            self._note_refusal(self.settings_error)
        self.script_refusal()  # REFUSED while the setting is wrong, STOPPED once fixed

    def _parse_settings(self, source: bytes) -> Optional[Settings]:
        """The settings of SOURCE, the file's bytes; None when they refuse
        it (``settings_error`` says why)."""
        try:
            own = parse_settings(source)
        except SettingsError as exc:
            self.settings_error = "%s%s: %s" % (SCRIPT_REFUSAL, self.name, exc)
            return None
        self.settings_error = None
        return own

    # -- the answer to a request ------------------------------------------

    def scrape(self, timeout: float) -> Outcome:
        """Answer one request: start the script if needed, and read its output
        if it is readable within the deadline (a starting script gets at most
        ``start_wait`` seconds).  While it waits, the script is not idle;
        idle time counts from the end of the last request."""
        self.touch()
        self.requests_in_flight += 1
        try:
            return self._scrape(timeout)
        finally:
            self.requests_in_flight -= 1
            self.touch()

    def _scrape(self, timeout: float) -> Outcome:
        if self.state in STARTABLE_STATES and self._run.proc is None:
            refusal = self.script_refusal()  # an idle session turns REFUSED or back
            if refusal:
                self._note_refusal(refusal)
                return Outcome(Outcome.BAD_SETTINGS if refusal == self.settings_error
                               else Outcome.FORBIDDEN, message=refusal)
            if self.state == REFUSED:
                # An autostart script waiting to check its file again: now.
                self.retry_now()
                return self._starting()
        if self.state == FAILED and not self.live:
            # Report the failure once; the next request starts afresh.
            outcome = Outcome(Outcome.FAILED, message=self.failure_report())
            self._transition(STOPPED)
            return outcome
        if self.state in STARTABLE_STATES and not self.live:
            refusal = self._admit(self) if self._admit is not None else None
            if refusal is not None:
                return Outcome(Outcome.BUSY, message=refusal, retry_after=RETRY_BUSY)
            self.start()
        if self.state == STOPPING:
            return not_ready("The script is stopping; it will start again on the next"
                             " request.", RETRY_STOPPING)
        if self.state == BACKOFF:
            wait = max(0.0, (self.backoff_until or 0) - self.clock())
            return not_ready("The script exited (%s) and will be restarted in %.0f s.\n%s"
                             % (self.last_error or "", wait, self._tail_text()),
                             max(RETRY_MIN, round(wait)))
        return self._read_live(timeout)

    def _read_live(self, timeout: float) -> Outcome:
        budget = min(timeout, self.config.start_wait) if self.state == STARTING else timeout
        deadline = self.clock() + budget
        while True:
            run = self._run  # an edit's version may take over while we wait
            path = run.reader.locate() if self.serving else run.reader.path
            if path is not None and (self.state != STARTING or run.output_expected):
                try:
                    data = run.reader.read(max(0.0, deadline - self.clock()), run.proc)
                except FileNotFoundError:
                    run.reader.path = None
                except output.UntrustedOutput as exc:
                    run.reader.path = None
                    self._output_refused(str(exc))
                    return Outcome(Outcome.UNTRUSTED, message=str(exc))
                except output.OutputTimeout as exc:
                    if self.state == STARTING:
                        return self._starting()
                    return unavailable(str(exc))
                except output.OutputError as exc:
                    if run is not self._run:
                        continue  # the version that was taken over stopped: read the new one
                    return unavailable(str(exc))
                else:
                    if self.serving:
                        self._output_ok()
                    return self._limit_series(data, run.reader.last_series)
            if not self.serving:
                # It exited (or is being stopped) while we waited.
                return self._scrape(timeout) if self.state != STOPPED else self._starting()
            remaining = deadline - self.clock()
            if remaining <= 0:
                if self.state == STARTING:
                    return self._starting()
                return unavailable("The script is running but its output file"
                                   " (%s/__prometheus) is missing." % run.module)
            self._os.wait([self._changed], min(LOCATE_INTERVAL, remaining))

    def _limit_series(self, data: bytes, series: int) -> Outcome:
        """DATA as the answer, unless it holds more samples (SERIES) than
        ``max_series``: then a refusal naming both numbers (logged once
        until an output falls back under the limit)."""
        limit = self.max_series
        over = limit is not None and series > limit
        if over != self._over_limit:
            self._over_limit = over
            if over:
                log.warning("series-limit: script=%s output of %d series is over the limit of"
                            " %d; not served until it falls back under", self.name, series,
                            limit)
            else:
                log.info("series-limit: script=%s output of %d series is within the limit"
                         " again", self.name, series)
        if over:
            return Outcome(Outcome.SERIES_LIMIT, message="The script's output has %d series,"
                           " more than the limit of %d." % (series, limit))
        return Outcome(Outcome.OK, body=data)

    def _starting(self) -> Outcome:
        if self.queued:
            return Outcome(Outcome.BUSY, retry_after=RETRY_QUEUED, message=(
                "%d scripts are starting, the most allowed at once (--max-starting); this"
                " one is queued and starts as soon as one of them is done"
                % self._start_slots.taken))
        return not_ready("The script %s is starting (systemtap may be compiling it)."
                         % self.name, RETRY_STARTING)

    def failure_report(self) -> str:
        text = "The script %s failed: %s." % (self.name, self.last_error or "unknown error")
        tail = self._tail_text()
        if tail:
            text += "\nLast lines of its standard error:\n" + tail
        return text

    # -- the watchdog: one greenlet per live script --------------------------

    def _watch(self) -> None:
        try:
            while True:
                uptime = self._run_once()
                if uptime is None:  # stopped, or refused until the next request
                    return
                if not self.autostart or self._stop_requested:
                    self._transition(FAILED)
                    return
                delay = self._backoff.delay(uptime)
                self.backoff_until = self.clock() + delay
                log.info("backoff: script=%s restarting in %.0f s after %s", self.name, delay,
                         self.last_error)
                self._transition(BACKOFF)
                if not self._wait_retry():
                    return
                self.restarts += 1
                self.ticket = self._start_slots.ticket()
                self._transition(STARTING)
        except BaseException:
            log.exception("watchdog-crashed: script=%s", self.name)
            for run in (self._run, self._next):
                if run is not None and run.proc is not None:
                    run.proc.signal_group(signal.SIGKILL)
            raise
        finally:
            self._watchdog = None
            self._wake.clear()

    def _run_once(self) -> Optional[float]:
        """One start, to its end.  Returns the run's uptime when it failed or
        exited on its own (FAILED or BACKOFF is the caller's), None when it
        was stopped (STOPPED) or its file refused (REFUSED)."""
        run = self._run
        run.tail.clear()
        run.produced = False
        run.began = None
        self._edited = False
        self.edit_error, self.edit_stderr = None, []
        try:
            source, st = self._read_source()
        except _StartEnded:
            return None
        except OSError as exc:
            return self._start_failed("cannot read %s: %s" % (self.script.path, exc.strerror))
        try:
            event = self._launch(run, source, st)
            if event != OUTPUT:
                return self._after(run, event)
            return self._serve()
        except _StartEnded:
            self._stopped()
            return None
        except _SpawnFailed as exc:
            return self._start_failed(str(exc))
        except OSError as exc:
            return self._start_failed("cannot start %s: %s" % (self.name, exc.strerror))
        finally:
            self._finish_run(self._run)

    def _launch(self, run: _Run, source: bytes, st: os.stat_result) -> str:
        """Start RUN on SOURCE, the script's bytes (ST: their fstat), until
        its output appears (OUTPUT) or what came first: its process exited
        (EXIT), a stop (STOP), the keepalive passed (IDLE), or, for an edit's
        version, the running version exited (ENDED).  Raises _StartEnded on
        a stop before a spawn, _SpawnFailed or OSError."""
        plan = self.config.plan
        driver = self._driver_reason or (plan.driver_reason if plan else "no loader plan")
        run.digest = build.digest(source)
        executable = bool(st.st_mode & 0o111)
        look_up = not (executable or driver)
        run.workdir, kept = in_pool(self._stage, run.module, source,
                                    run.digest if look_up else None)
        run.reader.annotator = Annotator(parse_declarations(
            source.decode("utf-8", "replace"))) or None
        if executable:
            return self._run_whole(run, WRAPPER, [self._copy(run.workdir), "-m", run.module])
        if driver is not None:
            if plan is not None and self._driver_reason is None:
                plan.note_driver(driver)
            return self._run_whole(run, DRIVER, self._driver_argv(run))
        if kept is not None:
            event = self._load_kept(run, kept)
            if event is not None:
                return event
        return self._compile_and_load(run)

    def _finish_run(self, run: _Run) -> None:
        """End RUN's process and remove its working directory: before the
        state says the run is over, so nobody sees a stopped script whose
        files are still there."""
        self._end_process(run)
        workdir, run.workdir = run.workdir, None
        if workdir is not None:
            rmtree(workdir)

    def _stopped(self) -> None:
        self._finish_run(self._run)
        if self.state != STOPPING:
            self._transition(STOPPING)
        self._transition(STOPPED)

    def _read_source(self):
        """The script file's bytes and fstat, read once through trusted
        descriptors (``trust.read_script``): what the rest of the start
        digests, parses and runs; its settings are taken from them.  A
        refusal (of the file or of a setting) ends the start REFUSED."""
        while True:
            try:
                source, st = in_pool(trust.read_script, self.script.path,
                                     not self.config.insecure_scripts)
            except trust.Untrusted as exc:
                refusal = "%s%s: %s" % (SCRIPT_REFUSAL, self.name, exc)
            else:
                self._file_id = file_identity(st)
                own = self._parse_settings(source)
                if own is not None:
                    self.settings = own
                    return source, st
                refusal = self.settings_error
            self._note_refusal(refusal)
            self.backoff_until = None
            if self.autostart and not self._stop_requested:
                self.backoff_until = self.clock() + self._backoff.delay(0.0)
            self._transition(REFUSED)
            if self.backoff_until is None or not self._wait_retry():
                raise _StartEnded()
            self._transition(STARTING)  # an autostart script's file is checked again

    def _stage(self, module: str, source: bytes, script_digest: Optional[str]):
        """(working directory, kept module or None), in the thread pool: a
        private working directory for MODULE holding a copy of SOURCE under
        the script's own name (what the compiler or a wrapper runs: nobody
        else can change it) and, when SCRIPT_DIGEST is given, the module
        kept for those bytes, copied in under the name MODULE."""
        workdir = tempfile.mkdtemp(prefix=naming.workdir_prefix(os.getpid(), module),
                                   dir=self.config.workdir_root)
        try:
            _write_private(os.path.join(workdir, self.script.name), source)
        except BaseException:
            trust.remove_tree(workdir)
            raise
        cache = self.config.cache
        if script_digest is None or cache is None or not cache.enabled:
            return workdir, None
        kept = cache.find([cache.key(script_digest, suffix, module)
                           for suffix in build.LOADERS
                           if not self.config.plan.loader_refusal(suffix)])
        if kept is None:
            return workdir, None
        try:
            cache.place(kept, workdir, module + os.path.splitext(kept)[1])
        except (OSError, trust.Untrusted) as exc:
            log.warning("cache: script=%s cannot use the kept module (%s); recompiling",
                        self.name, escape_line(getattr(exc, "strerror", None) or str(exc)))
            cache.drop_now(kept)
            return workdir, None
        return workdir, kept

    def _copy(self, workdir: str) -> str:
        return os.path.join(workdir, self.script.name)

    def _load_kept(self, run: _Run, kept: str) -> Optional[str]:
        """Load the kept module KEPT; how the wait for its output ended, or
        None when it would not run (forgotten: compile next)."""
        suffix = os.path.splitext(kept)[1]
        proc = self._spawn(run, LOAD, self.config.plan.loader_argv(suffix, run.module + suffix))
        event = self._wait(run, until=OUTPUT)
        if event == EXIT:
            # A changed kernel or runtime, say: forget it and compile afresh,
            # without bothering the client.
            log.warning("cache: script=%s pid=%d compiled module failed (%s); recompiling",
                        self.name, proc.pid, describe_exit(proc.returncode))
            self.config.cache.drop(kept)
            self._end_process(run)
            return None
        return event

    def _compile_and_load(self, run: _Run) -> str:
        """Compile RUN's copy, then load the module; how the wait for its
        output ended (``_launch``)."""
        plan = self.config.plan
        with self._start_slots.hold(self):
            proc = self._spawn(run, COMPILE, plan.compile_argv(run.module,
                                                               self._copy(run.workdir)))
            event = self._wait(run)
            if event != EXIT:
                return event
            module_file = _compiled_module(run.workdir, run.module)
            if proc.returncode != 0 or module_file is None:
                if proc.returncode == 0:
                    run.tail.append("the compile left no module in its working directory")
                return EXIT
            log.info("compiled: script=%s pid=%d module=%s", self.name, proc.pid, run.module)
            self._end_process(run)
            suffix = os.path.splitext(module_file)[1]
            refusal = plan.loader_refusal(suffix)
            if refusal:
                plan.note_driver(refusal)
                self._spawn(run, DRIVER, self._driver_argv(run))
                return self._wait(run, until=OUTPUT)
            proc = self._spawn(run, LOAD, plan.loader_argv(suffix, module_file))
            # Kept while the loader starts, not before: the copy would
            # delay the first metrics.
            if self.config.cache is not None and self.config.cache.store(
                    run.workdir, module_file,
                    self.config.cache.key(run.digest, suffix, run.module)):
                log.info("cache: script=%s kept the compiled module for the next start",
                         self.name)
            event = self._wait(run, until=OUTPUT)
            if event == EXIT:
                # The loader alone does not run here as stap would run it (an
                # environment stap's wrapper sets up, say): from now on this
                # script runs through the stap driver.
                self._driver_reason = "the loader alone failed (%s)" % describe_exit(
                    proc.returncode)
                log.warning("driver: script=%s pid=%d %s; running it through the stap driver"
                            " from now on", self.name, proc.pid, self._driver_reason)
                self._end_process(run)
                self._spawn(run, DRIVER, self._driver_argv(run))
                event = self._wait(run, until=OUTPUT)
            return event

    def _driver_argv(self, run: _Run) -> List[str]:
        return list(self.config.stap) + ["-m", run.module, self._copy(run.workdir)]

    def _run_whole(self, run: _Run, kind: str, argv: List[str]) -> str:
        """Run a wrapper or the stap driver: compile and run in one process
        (it holds a --max-starting slot until its output appears)."""
        with self._start_slots.hold(self):
            self._spawn(run, kind, argv)
            return self._wait(run, until=OUTPUT)

    def _serve(self) -> Optional[float]:
        """Serve until the process exits, idles out or is stopped; an edit
        of the file meanwhile starts its new version (``_try_edit``)."""
        while True:
            event = self._wait(self._run, until=EDITED)
            if event != EDITED:
                return self._after(self._run, event)
            self._try_edit()

    def _after(self, run: _Run, event: str) -> Optional[float]:
        """RUN ends by EVENT: stopped (None) or exited (its uptime)."""
        if event == EXIT:
            return self._exited(run)
        proc = run.proc
        self._transition(STOPPING)
        log.info("stopping: script=%s pid=%d reason=%s", self.name, proc.pid,
                 "idle for %gs" % self.keepalive if event == IDLE else event)
        proc.terminate(self.config.stop_grace)
        self._finish_run(run)
        self.exits["stopped"] += 1
        log.info("stopped: script=%s pid=%d (%s)", self.name, proc.pid,
                 describe_exit(proc.returncode))
        self._transition(STOPPED)
        return None

    def _exited(self, run: _Run) -> Optional[float]:
        proc = run.proc
        uptime = self.clock() - (self.started_at or self.clock())
        self._finish_run(run)
        self.last_error = describe_exit(proc.returncode)
        self.exits["error" if proc.returncode != 0 else "exited"] += 1
        log.warning("exited: script=%s pid=%d (%s; not expected)", self.name, proc.pid,
                    self.last_error)
        if self._stop_requested:
            self._stopped()
            return None
        return uptime

    def _start_failed(self, message: str) -> Optional[float]:
        log.error("spawn-failed: script=%s %s", self.name, escape_line(message))
        self.last_error = message
        self.stderr_tail.append(message)
        self.exits["spawn_error"] += 1
        if self._stop_requested:
            self._stopped()
            return None
        return 0.0

    # -- an edited file: the new version beside the running one ---------------

    def _try_edit(self) -> None:
        """The file changed while the script runs: start the new version
        beside the running one, as any start does, under the other module
        name (``naming.version_module``).  Once its output appears it takes
        over.  Otherwise the running version goes on: a failed edit is kept
        in ``edit_error`` and logged, and a stop, the keepalive or the
        running version's exit end the new one (the serving wait sees why)."""
        self._edited = False
        try:
            source, st = in_pool(trust.read_script, self.script.path,
                                 not self.config.insecure_scripts)
        except trust.Untrusted as exc:
            return self._edit_failed("%s%s: %s" % (SCRIPT_REFUSAL, self.name, exc))
        except OSError:
            return  # removed, say: the running version goes on
        self._file_id = file_identity(st)
        if build.digest(source) == self._run.digest:
            return  # touched, not changed
        own = self._parse_settings(source)
        if own is None:
            return self._edit_failed(self.settings_error)
        new = self._next = _Run(self.name, naming.version_module(self.script.module,
                                                                 self.version + 1),
                                self.config, self.clock)
        self.ticket = self._start_slots.ticket()
        log.info("edited: script=%s module=%s starting the new version beside the running one",
                 self.name, new.module)
        try:
            event = self._launch(new, source, st)
            if event == OUTPUT:
                self._take_over(new, own)
            elif event == EXIT:
                proc = new.proc
                self._end_process(new)  # its last lines of standard error are in
                self._edit_failed("the new version failed (%s)" % describe_exit(proc.returncode),
                                  new.tail)
        except _StartEnded:
            pass  # a stop: the serving wait sees it
        except _SpawnFailed as exc:
            self._edit_failed(str(exc), new.tail)
        except OSError as exc:
            self._edit_failed("cannot start the new version: %s" % exc.strerror, new.tail)
        finally:
            self._next = None
            if new is not self._run:
                if new.proc is not None and not new.proc.exited():
                    new.proc.terminate(self.config.stop_grace)
                self._finish_run(new)

    def _take_over(self, new: _Run, own: Settings) -> None:
        """NEW's output appeared: it serves from now on, with its settings
        OWN, and the version it replaces stops (its ``probe end`` runs) once
        the reads of it under way are done."""
        old, self._run = self._run, new
        self.settings = own
        self.version += 1
        self.started_at, self.first_output_at = new.began, self.clock()
        self.starts += 1
        self.edit_error, self.edit_stderr = None, []
        log.info("edited: script=%s pid=%d module=%s took over after %.1f s from pid %d",
                 self.name, new.proc.pid, new.module, self.first_output_at - new.began,
                 old.proc.pid)
        reads = old.reader.in_flight
        if reads is not None:
            self._os.wait([reads], READS_DRAIN)
        proc = old.proc
        proc.terminate(self.config.stop_grace)
        self._finish_run(old)
        self.exits["stopped"] += 1
        log.info("stopped: script=%s pid=%d (%s)", self.name, proc.pid,
                 describe_exit(proc.returncode))

    def _edit_failed(self, message: str, tail=()) -> None:
        """An edit did not take over: MESSAGE (and TAIL, its last lines of
        standard error) shown until the next edit or start, logged once."""
        self.edit_error = "edit not applied, the running version goes on: " + message
        self.edit_stderr = list(tail)
        self.edit_failures += 1
        log.warning("edit-failed: script=%s %s", self.name, escape_line(self.edit_error))

    # -- processes and waits ----------------------------------------------------

    def _spawn(self, run: _Run, kind: str, argv: List[str]) -> Process:
        """Fork the next process of RUN's start.  Raises _StartEnded when a
        stop was asked for, _SpawnFailed when the fork failed."""
        if self._stop_requested:
            raise _StartEnded()
        run.reader.new_run()
        # A stale output from an earlier run that died unseen would be read
        # instead of the new one (and never answer): start from a clean slate.
        for directory in remove_module_dirs(run.module, self.config.procfs_dirs):
            log.warning("stale: script=%s removed %s left by an earlier run", self.name,
                        directory)
        proc = Process(self.name, kind, run.tail, self._os)
        began = self.clock()  # the spawn yields to the hub until the exec
        try:
            proc.spawn(argv, run.workdir)
        except OSError as exc:
            raise _SpawnFailed("cannot run %s: %s" % (argv[0], exc.strerror)) from None
        run.proc = proc
        if run.began is None:  # the start's first process: when the start began
            run.began = began
            if run is self._run:
                self.started_at = began
                self.starts += 1
        if run is self._run:
            self.last_error = None
        shown = escape_line(" ".join(argv))
        if kind == COMPILE:
            log.info("compiling: script=%s pid=%d module=%s argv=%s", self.name, proc.pid,
                     run.module, shown)
        else:
            log.info("spawned: script=%s pid=%d module=%s run=%s argv=%s", self.name, proc.pid,
                     run.module, kind, shown)
        return proc

    def _wait(self, run: _Run, until: Optional[str] = None) -> str:
        """Block until RUN's process exits (EXIT), a stop is asked for (STOP),
        the keepalive passes without requests (IDLE) or UNTIL happens: its
        output appeared (OUTPUT), or the file was edited while it runs
        (EDITED).  For an edit's version, also until the running version
        exits (ENDED).  Until the output appears (or while it is refused),
        look for it (``output_poll_interval``)."""
        proc = run.proc
        beside = self._run.proc if run is not self._run else None
        looking = proc.kind != COMPILE
        while True:
            if self._stop_requested:
                return STOP
            timeout = None
            keepalive = self.keepalive
            if keepalive is not None:
                timeout = keepalive if self.requests_in_flight else \
                    self.last_request + keepalive - self.clock()
                if timeout <= 0:
                    return IDLE
            if looking and self._pending(run):
                self._look_for_output(run)
            if until == OUTPUT and run.produced:
                return OUTPUT
            if until == EDITED and self._edited and self.state == RUNNING:
                return EDITED
            if looking and self._pending(run):
                poll = output_poll_interval(self.clock() - proc.spawned_at)
                timeout = poll if timeout is None else min(timeout, poll)
            self._os.wait([proc.result, self._wake] + ([beside.result] if beside else []),
                          timeout)
            if beside is not None and beside.exited():
                return ENDED
            if proc.exited() and not self._stop_requested:
                return EXIT
            self._wake.clear()

    def _pending(self, run: _Run) -> bool:
        """True while RUN's output is to be looked for: not found yet, or
        refused."""
        return self.state in OUTPUT_PENDING_STATES if run is self._run else not run.produced

    def _wait_retry(self) -> bool:
        """Sleep until ``backoff_until``; False (and STOPPED) if a stop came
        first."""
        while not self._stop_requested:
            remaining = (self.backoff_until or 0) - self.clock()
            if remaining <= 0:
                return True
            self._os.wait([self._wake], remaining)
            self._wake.clear()
        self._transition(STOPPED)
        return False

    def _end_process(self, run: _Run) -> None:
        """What every end of a process needs: drain its output pumps, stop
        what is left of its group, remove any module directory the runtime
        left (the BPF runtime's FIFO directory after a SIGKILL), forget it."""
        proc = run.proc
        if proc is None:
            return
        proc.reap(self.config.stop_grace)
        remove_module_dirs(run.module, self.config.procfs_dirs)
        run.reader.path = None
        run.proc = None

    # -- state -------------------------------------------------------------

    def _transition(self, new: str) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise RuntimeError("%s: invalid transition %s -> %s" % (self.name, old, new))
        self.state = new
        log.debug("state: script=%s %s -> %s", self.name, old, new)
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()

    def _note_refusal(self, message: str) -> None:
        """A trust refusal: shown as the last error, logged once per cause."""
        self.last_error = message
        if message not in self._refusals_logged:
            if len(self._refusals_logged) >= MAX_REFUSALS_REMEMBERED:
                self._refusals_logged.clear()
            self._refusals_logged.add(message)
            log.warning("refused: script=%s %s", self.name, escape_line(message))

    def _look_for_output(self, run: _Run) -> None:
        """STARTING (or REFUSED for its output) -> RUNNING once the output
        exists and may be trusted, or -> REFUSED when it may not.  An edit's
        version only notes that its output may be trusted."""
        exists, refusal = run.reader.appeared()
        if not exists:
            return
        if run is not self._run:
            if refusal:
                self._note_refusal(refusal)
            run.produced = not refusal
        elif refusal:
            self._output_refused(refusal)
        else:
            self._output_ok()

    def _output_refused(self, message: str) -> None:
        """The running process's output is not trusted: REFUSED (the process
        runs on), MESSAGE shown and logged once."""
        if self.state in (STARTING, RUNNING) and self._run.output_expected:
            self._transition(REFUSED)
        self._note_refusal(message)

    def _output_ok(self) -> None:
        """The output exists and passed the trust checks: RUNNING, the
        first-output time of this run noted, a refusal's error forgotten."""
        if self.first_output_at is None or self.started_at is None \
                or self.first_output_at < self.started_at:
            self.first_output_at = self.clock()
        self._run.produced = True
        if self.last_error in self._refusals_logged:
            self.last_error = None  # the cause is gone
        self._refusals_logged.clear()
        if self.state == STARTING:
            self._transition(RUNNING)
            log.info("running: script=%s pid=%s output appeared after %.1f s", self.name,
                     self.pid, self.first_output_at - (self.started_at or self.first_output_at))
        elif self.state == REFUSED:
            self._transition(RUNNING)
            log.info("running: script=%s pid=%s output trusted again", self.name, self.pid)

    def _tail_text(self) -> str:
        return "\n".join(self.stderr_tail)


class StartSlots:
    """--max-starting: how many starts may compile at once, shared by every
    session.  A slot is taken at once when one is free and nobody waits;
    otherwise the start is queued, and slots are handed on in the order the
    starts were asked for (their tickets), so a new start never jumps the
    queue.  LIMIT None: no limit."""

    def __init__(self, limit: Optional[int]):
        self.limit = limit
        self.taken = 0
        self._queue: List[Tuple[int, gevent.event.Event]] = []  # by ticket
        self._tickets = itertools.count()

    def ticket(self) -> int:
        """A start's place in line, taken when it is asked for."""
        return next(self._tickets)

    @contextlib.contextmanager
    def hold(self, session: "Session"):
        """Hold a slot for SESSION's start; a stop while it is queued ends
        the start (``_StartEnded``)."""
        if self.limit is None:
            yield
            return
        if self.taken < self.limit and not self._queue:
            self.taken += 1
        else:
            self._wait_turn(session)
        try:
            yield
        finally:
            self.taken -= 1
            self._hand_on()

    def _wait_turn(self, s: "Session") -> None:
        turn = gevent.event.Event()
        entry = (s.ticket, turn)
        bisect.insort(self._queue, entry, key=lambda e: e[0])
        s.queued = True
        log.info("queued: script=%s %d scripts are starting (--max-starting %d); it starts"
                 " when one of them is done", s.name, self.taken, self.limit)
        try:
            while not turn.is_set() and not s._stop_requested:
                s._os.wait([turn, s._wake], None)
                s._wake.clear()
        finally:
            s.queued = False
            if entry in self._queue:
                self._queue.remove(entry)
        if s._stop_requested:
            if turn.is_set():  # handed a slot as the stop came: pass it on
                self.taken -= 1
                self._hand_on()
            raise _StartEnded()
        log.info("dequeued: script=%s starting (its turn under --max-starting)", s.name)
        s.touch()  # its idle time counts from its start, not from the request that queued it

    def _hand_on(self) -> None:
        """Give free slots to the first in line (counted as taken for them)."""
        while self._queue and self.taken < self.limit:
            _ticket, turn = self._queue.pop(0)
            self.taken += 1
            turn.set()


def _compiled_module(workdir: str, module: str) -> Optional[str]:
    """The module file a compile left in WORKDIR (a regular file, not a
    link), or None."""
    for suffix in build.LOADERS:
        name = module + suffix
        try:
            if stat.S_ISREG(os.lstat(os.path.join(workdir, name)).st_mode):
                return name
        except OSError:
            continue
    return None


def _write_private(path: str, content: bytes) -> None:
    """Write CONTENT to the new file PATH, readable and runnable by its
    owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o700)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
    finally:
        trust.close_now(fd)
