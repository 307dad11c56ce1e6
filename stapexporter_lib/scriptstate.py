"""What one script's session is now, as the index page and the self-metrics
show it: its state (every change through ``ScriptState._transition``,
checked against ``states.TRANSITIONS``), its trust refusals, and whether its
output has appeared and been read.

``RUNNING`` is honest: the watchdog (``lifecycle.py``) calls
``_look_for_output`` while a script starts, and the session turns running as
soon as its output exists and passes the trust checks, whether or not a
request has read it.  A refused script file or output turns it ``REFUSED``
with the reason as its last error.

Owns the state and its transitions, the refusal bookkeeping and the
first-output time.  Must not spawn, signal or wait for processes
(``lifecycle.py``/``child.py``), answer scrapes (``session.py``) or open
output files (``reader.py``/``procfs.py``).
"""

import logging
from typing import Callable, Optional

import gevent
import gevent.event

from . import trust
from .catalog import Script
from .child import ChildRun, escape_line
from .reader import OutputReader
from .states import (BACKOFF, FAILED, REFUSED, RUNNING, SERVING_STATES, STARTING, STOPPED,
                     TRANSITIONS)

log = logging.getLogger("stap-exporter")

# How a script trust refusal starts (to know when one is fixed), and how many
# distinct refusals a session remembers (each is logged once).
SCRIPT_REFUSAL = "refused to run "
MAX_REFUSALS_REMEMBERED = 64

# While a script starts (or its output is refused), how often the watchdog
# looks for its output: a few metadata calls (trust.output_refusal), no read.
# Often right after a spawn (a loader on a compiled module makes its output
# within milliseconds: stapbpf in about 5-10 ms), then a quarter of the time
# since the spawn, up to OUTPUT_POLL_INTERVAL (a compile takes a while):
# about 25 looks in the first second of a start, then 5 a second.
OUTPUT_POLL_FIRST = 0.0025
OUTPUT_POLL_INTERVAL = 0.2


def output_poll_interval(since_spawn: float) -> float:
    """How long the watchdog waits before it looks for the output again,
    SINCE_SPAWN seconds after the run's process was spawned."""
    return min(OUTPUT_POLL_INTERVAL, max(OUTPUT_POLL_FIRST, since_spawn / 4))


class ScriptState:
    """The observable side of one script's session (``lifecycle.Lifecycle``
    adds the process side)."""

    def __init__(self, script: Script, config, clock: Callable[[], float]):
        self.script = script
        self.config = config  # lifecycle.SessionConfig
        self.clock = clock
        self.state = STOPPED
        self.last_error: Optional[str] = None
        self.started_at: Optional[float] = None  # clock() as the last start's spawn began
        self.first_output_at: Optional[float] = None  # clock() of the last start's first output
        self.backoff_until: Optional[float] = None
        self._run: Optional[ChildRun] = None
        self._watchdog: Optional[gevent.Greenlet] = None
        self._wake = gevent.event.Event()
        self._changed = gevent.event.Event()
        self._reader = OutputReader(script, config.procfs_dirs, config.max_output, clock)
        self._produced = False  # this run's output has appeared (and was trusted)
        self._refusals_logged = set()  # trust refusals logged (once per cause)

    @property
    def name(self) -> str:
        return self.script.name

    @property
    def pid(self) -> Optional[int]:
        return self._run.pid if self._run is not None else None

    @property
    def last_output_bytes(self) -> int:
        return self._reader.last_output_bytes

    @property
    def output_read(self) -> bool:
        """True once the current run's output has been read."""
        return self._reader.read_this_run

    @property
    def serving(self) -> bool:
        """True while a process runs whose output a request may be answered
        from (a refused output is checked again)."""
        return self.state in SERVING_STATES and (self.state != REFUSED or self._run is not None)

    @property
    def live(self) -> bool:
        """True while a process exists or a restart is pending."""
        return self._watchdog is not None

    def uptime(self) -> Optional[float]:
        if self.serving and self._run is not None and self.started_at is not None:
            return self.clock() - self.started_at
        return None

    def retry_in(self) -> Optional[float]:
        """Seconds until the watchdog restarts the script (backoff) or checks
        its refused file again (autostart); None when it does not wait."""
        if self.state in (BACKOFF, REFUSED) and self._run is None and self.live \
                and self.backoff_until is not None:
            return max(0.0, self.backoff_until - self.clock())
        return None

    def retry_now(self) -> None:
        """End the watchdog's wait at once (a request found the refused
        file of an autostart script fixed)."""
        self.backoff_until = self.clock()
        self._wake.set()

    def script_refusal(self) -> Optional[str]:
        """None if the script file may run as root now, else why not (it is
        checked before every start: the file may change while we run).
        Shown on the index page as the last error while it lasts; a session
        without a process turns REFUSED while it lasts and STOPPED once fixed."""
        if self.config.insecure_scripts:
            return None
        refusal = trust.script_refusal(self.script.path)
        idle = not self.live
        if refusal:
            refusal = "%s%s: %s" % (SCRIPT_REFUSAL, self.name, refusal)
            self.last_error = refusal
            if idle and self.state in (STOPPED, FAILED):
                self._transition(REFUSED)
            return refusal
        if self.last_error and self.last_error.startswith(SCRIPT_REFUSAL):
            self.last_error = None  # fixed since
        if idle and self.state == REFUSED:
            self._transition(STOPPED)
        return None

    def note_refusal(self, message: str) -> None:
        """A trust refusal: shown as the last error, logged once per cause."""
        self.last_error = message
        if message not in self._refusals_logged:
            if len(self._refusals_logged) >= MAX_REFUSALS_REMEMBERED:
                self._refusals_logged.clear()
            self._refusals_logged.add(message)
            log.warning("refused: script=%s %s", self.name, escape_line(message))

    def _transition(self, new: str) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise RuntimeError("%s: invalid transition %s -> %s" % (self.name, old, new))
        self.state = new
        log.debug("state: script=%s %s -> %s", self.name, old, new)
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()

    def _look_for_output(self) -> None:
        """STARTING (or REFUSED for its output) -> RUNNING once the output
        exists and may be trusted, or -> REFUSED when it may not."""
        exists, refusal = self._reader.appeared()
        if not exists:
            return
        if refusal:
            self.output_refused(refusal)
        else:
            self.output_ok()

    def output_refused(self, message: str) -> None:
        """The running process's output is not trusted: REFUSED (the process
        runs on), MESSAGE shown and logged once.  (Before the spawn, what was
        found is a stale output: the spawn removes it, the state stays.)"""
        if self.state in (STARTING, RUNNING) and self._run is not None:
            self._transition(REFUSED)
        self.note_refusal(message)

    def output_ok(self) -> None:
        """The output exists and passed the trust checks (found by the
        watchdog, or read by a request): RUNNING, the first-output time of
        this run noted, a refusal's error forgotten."""
        if self.first_output_at is None or self.started_at is None \
                or self.first_output_at < self.started_at:
            self.first_output_at = self.clock()  # start-up time metric
        self._produced = True
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
