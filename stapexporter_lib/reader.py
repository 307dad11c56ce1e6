"""Reading one script's output for the session: where it is, one read shared
by all concurrent requests (single-flight), and what is served.

``OutputReader`` locates ``MODULE/__prometheus`` in the procfs directories,
serializes reads (a FIFO never sees two readers at once, and a burst of
scrapes costs one read), checks that the script did not die while writing,
completes the last line, replaces bytes that are not UTF-8 and adds the
declared ``# HELP``/``# TYPE`` lines.

It also tells the watchdog whether a starting script's output has appeared
and may be trusted (``appeared``), without opening it.

Owns the output path of the current run, whether it has been read, and the
annotation.  Must not change
the session's state, start or signal processes (the session passes the run
in), or know about HTTP; the blocking-free opening and reading itself lives in
``procfs.py``.
"""

import logging
from typing import Callable, List, Optional, Tuple

import gevent
import gevent.event

from . import procfs
from .catalog import Script
from .declarations import Annotator

log = logging.getLogger("stap-exporter")

# How long a read that ended without a final newline waits to see whether
# the script died while writing.
EXIT_NOTICE = 0.05


class OutputReader:
    """The output of one script's runs."""

    def __init__(self, script: Script, procfs_dirs: List[str], max_output: int,
                 clock: Callable[[], float], read=procfs.read_output):
        self.name = script.name
        self.module = script.module
        self.procfs_dirs = procfs_dirs
        self.max_output = max_output
        self._clock = clock
        self._read = read
        self.path: Optional[str] = None
        self.annotator: Optional[Annotator] = None
        self.last_output_bytes = 0
        self.read_this_run = False  # the current run's output has been read
        self._flight: Optional[gevent.event.AsyncResult] = None
        self._utf8_warned = False

    def new_run(self) -> None:
        """A new process starts: its output is elsewhere until found, and
        its first invalid UTF-8 is worth a warning again."""
        self.path = None
        self.read_this_run = False
        self._utf8_warned = False

    def locate(self) -> Optional[str]:
        """The output's path, looked up while unknown; None if none yet."""
        if self.path is None:
            self.path = procfs.find_output(self.module, self.procfs_dirs)
        return self.path

    def appeared(self) -> Tuple[bool, Optional[str]]:
        """(whether the output exists, why it may not be read or None).
        Only metadata is looked at (``procfs.output_refusal``): a FIFO is not
        opened, so its writer is not woken."""
        location = self.locate()
        if location is None:
            return False, None
        try:
            return True, procfs.output_refusal(location)
        except OSError:  # gone again, or not checkable now: look again later
            self.path = None
            return False, None

    def read(self, timeout: float, run) -> bytes:
        """Read the output of RUN (a ``child.ChildRun``, or None), sharing one
        read among concurrent callers (single-flight): reads of one script are
        serialized, and a FIFO never sees two readers at once.  Raises what
        ``procfs.read_output`` raises."""
        flight = self._flight
        if flight is not None:
            try:
                return flight.get(timeout=timeout)
            except gevent.Timeout:
                raise procfs.OutputTimeout("timed out waiting for the script's output") from None
        flight = self._flight = gevent.event.AsyncResult()
        try:
            data = self._read(self.path, timeout, self.max_output, self._clock)
            if self._died_while_writing(data, run):
                raise procfs.OutputError("the script exited while writing its output")
            data = self._finish(data, run.pid if run is not None else None)
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, Exception)
                                 else procfs.OutputError("read aborted"))
            raise
        else:
            flight.set(data)
            return data
        finally:
            self._flight = None

    @staticmethod
    def _died_while_writing(data: bytes, run) -> bool:
        """True if the process ended as its output was read: the text may be
        cut short.  A text that does not end with a newline is suspect, so
        then wait a moment for an exit to be noticed."""
        if run is None:
            return False
        if not run.exited() and data and not data.endswith(b"\n"):
            run.result.wait(EXIT_NOTICE)
        return run.exited()

    def _finish(self, data: bytes, pid: Optional[int]) -> bytes:
        """Complete the last line, add declared HELP/TYPE lines."""
        if data and not data.endswith(b"\n"):
            data += b"\n"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # We promise charset=utf-8: replace what is not (an odd process
            # name in a label, say) rather than fail the whole scrape.
            if not self._utf8_warned:
                log.warning("output: script=%s pid=%s output is not valid UTF-8 (%s at byte"
                            " %d); invalid bytes are replaced", self.name, pid,
                            exc.reason, exc.start)
                self._utf8_warned = True
            data = data.decode("utf-8", "replace").encode("utf-8")
        if self.annotator:
            data = self.annotator.annotate(data)
        self.last_output_bytes = len(data)
        self.read_this_run = True
        return data
