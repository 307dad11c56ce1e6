"""The answer to a scrape: a ``Session`` is one script's ``lifecycle.Lifecycle``
plus what a request gets from it -- start it if needed (when the manager
admits it), read its output within the deadline, or say why not.

Owns the ``Outcome`` boundary: sessions answer with outcomes, never with HTTP
(``app.py`` maps them to status codes).  Must not fork, signal or wait for
processes (``child.py``/``lifecycle.py``) or open output files itself
(``reader.py``/``procfs.py``).
"""

import os
import time
from typing import Callable, Optional

from gevent import subprocess

from . import procfs
from .catalog import Script
from .child import Waiter, wait_any
from .lifecycle import Lifecycle, SessionConfig  # noqa: F401 (SessionConfig re-exported)
from .states import BACKOFF, FAILED, REFUSED, STARTABLE_STATES, STARTING, STOPPED, STOPPING

# The longest a request that finds its script starting waits for output.
START_WAIT = 1.0
# While a request waits for a starting script, how often it looks for the
# output file (it also wakes at once when the script exits).
LOCATE_INTERVAL = 0.05

# Retry-After (seconds) of answers that are not the output.
RETRY_BUSY = 5           # a cap on running scripts refused the start
RETRY_QUEUED = 2         # the start waits its turn (--max-starting)
RETRY_STOPPING = 1       # stopping: the next request starts it again
RETRY_STARTING = 2       # starting (compiling)
RETRY_UNAVAILABLE = 1    # running, but the output could not be read
RETRY_MIN = 1            # the least Retry-After a backoff answer gives


class Outcome:
    """What a scrape produced.  KIND is one of the constants below."""

    OK = "ok"                # BODY is the script's output
    NOT_READY = "not_ready"  # starting, restarting or stopping: try again soon
    FAILED = "failed"        # the script exited with an error: MESSAGE says why
    UNAVAILABLE = "unavailable"  # running, but its output could not be read
    BUSY = "busy"            # not started: a cap on running or starting scripts
    # Refusals (trust.py): MESSAGE names the path and the reason.
    UNTRUSTED = "untrusted_output"  # the output path is not trusted: nothing read
    FORBIDDEN = "untrusted_script"  # the script file is not trusted: not started

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


class Session(Lifecycle):
    """One script: its lifecycle, and the answers to requests for it."""

    def __init__(self, script: Script, config: SessionConfig,
                 clock: Callable[[], float] = time.monotonic,
                 popen=subprocess.Popen, admit: Optional[Callable[["Session"], Optional[str]]] = None,
                 wait: Waiter = wait_any, killpg: Callable[[int, int], None] = os.killpg,
                 kill: Callable[[int, int], None] = os.kill,
                 start_over: Callable[[], None] = lambda: None):
        super().__init__(script, config, clock=clock, popen=popen, wait=wait, killpg=killpg,
                         kill=kill, start_over=start_over)
        self._admit = admit
        # Its start waits for a --max-starting slot (the manager's queue).
        self.queued = False

    def scrape(self, timeout: float) -> Outcome:
        """Answer one request: start the script if needed, and read its output
        if it is readable within the deadline (a starting script gets at most
        ``start_wait`` seconds).  While it waits, the script is not idle (a
        start may take longer than --keepalive); idle time counts from the
        end of the last request."""
        self.touch()
        self.requests_in_flight += 1
        try:
            return self._scrape(timeout)
        finally:
            self.requests_in_flight -= 1
            self.touch()

    def _scrape(self, timeout: float) -> Outcome:
        if self.state in STARTABLE_STATES and self._run is None:
            refusal = self.script_refusal()  # an idle session turns REFUSED or back
            if refusal:
                return self._refuse(Outcome.FORBIDDEN, refusal)
            if self.state == REFUSED:
                # An autostart script waiting to check its file again: now.
                self.retry_now()
                return self._not_ready()
        if self.state == FAILED:
            # Report the failure once; the next request starts afresh.
            outcome = Outcome(Outcome.FAILED, message=self.failure_report())
            self._transition(STOPPED)
            return outcome
        start_wait = None
        if self.state in STARTABLE_STATES and not self.live:
            refusal = self._admit(self) if self._admit is not None else None
            if refusal is None:
                self.start()
            elif not self.queued:
                return Outcome(Outcome.BUSY, message=refusal, retry_after=RETRY_BUSY)
            else:  # the manager starts it when its turn comes: wait for that
                waited = self._wait_for_turn(min(timeout, self.config.start_wait))
                if self.queued:
                    return Outcome(Outcome.BUSY, message=refusal, retry_after=RETRY_QUEUED)
                timeout -= waited
                start_wait = max(0.0, self.config.start_wait - waited)
        if self.state == STOPPING:
            return not_ready("The script is stopping; it will start again on the next"
                             " request.", RETRY_STOPPING)
        if self.state == BACKOFF:
            wait = max(0.0, (self.backoff_until or 0) - self.clock())
            return not_ready("The script exited (%s) and will be restarted in %.0f s.\n%s"
                             % (self.last_error or "", wait, self._tail_text()),
                             max(RETRY_MIN, round(wait)))
        return self._read_live(timeout, start_wait)

    def _wait_for_turn(self, budget: float) -> float:
        """Wait at most BUDGET seconds for the manager to start this queued
        script; the seconds waited."""
        began = self.clock()
        while self.queued:
            remaining = began + budget - self.clock()
            if remaining <= 0:
                break
            self._os.wait([self._changed], remaining)
        return self.clock() - began

    def failure_report(self) -> str:
        text = "The script %s failed: %s." % (self.name, self.last_error or "unknown error")
        tail = self._tail_text()
        if tail:
            text += "\nLast lines of its standard error:\n" + tail
        return text

    def _read_live(self, timeout: float, start_wait: Optional[float] = None) -> Outcome:
        starting = self.state == STARTING
        if start_wait is None:
            start_wait = self.config.start_wait
        budget = min(timeout, start_wait) if starting else timeout
        deadline = self.clock() + budget
        while True:
            path = self._reader.locate() if self.serving else self._reader.path
            if path is not None:
                try:
                    data = self._reader.read(max(0.0, deadline - self.clock()), self._run)
                except FileNotFoundError:
                    self._reader.path = None
                except procfs.UntrustedOutput as exc:
                    self._reader.path = None
                    self.output_refused(str(exc))
                    return Outcome(Outcome.UNTRUSTED, message=str(exc))
                except procfs.OutputTimeout as exc:
                    if self.state == STARTING:
                        return self._not_ready()
                    return unavailable(str(exc))
                except procfs.OutputError as exc:
                    return unavailable(str(exc))
                else:
                    if self.serving:
                        self.output_ok()
                    self._launch.keep_compiled()  # the start is over
                    return Outcome(Outcome.OK, body=data)
            if not self.serving:
                # It exited (or is being stopped) while we waited.
                return self._scrape(timeout) if self.state != STOPPED else self._not_ready()
            remaining = deadline - self.clock()
            if remaining <= 0:
                if self.state == STARTING:
                    return self._not_ready()
                return unavailable("The script is running but its output file"
                                   " (%s/__prometheus) is missing." % self.script.module)
            self._os.wait([self._changed], min(LOCATE_INTERVAL, remaining))

    def _refuse(self, kind: str, message: str) -> Outcome:
        """A trust refusal (see ``Lifecycle.note_refusal``) as an answer."""
        self.note_refusal(message)
        return Outcome(kind, message=message)

    def _not_ready(self) -> Outcome:
        return not_ready("The script %s is starting (systemtap may be compiling it)."
                         % self.name, RETRY_STARTING)
