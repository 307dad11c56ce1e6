"""Locating and reading a script's ``MODULE/__prometheus`` output, and the
one read of it that concurrent requests share (``OutputReader``).

Two shapes exist in the wild:

* the kernel-module runtime makes a regular procfs file
  ``/proc/systemtap/MODULE/__prometheus`` (capped at 64 KiB by the tapset);
* the BPF runtime makes a FIFO ``/var/tmp/systemtap-USER/MODULE/__prometheus``.
  ``stapbpf`` opens it for writing, writes the current text, closes it, and
  reopens it for the next reader.

Both are opened through trust.open_output: every directory from the
``--procfs-dirs`` entry down must be trusted, no link is followed, and only a
regular file or FIFO owned by root (or our user) is read; anything else is
refused with UntrustedOutput naming the path and the reason.

Neither may block the gevent hub.  A plain ``open()`` of a FIFO without a
writer blocks forever, so FIFOs are opened with ``O_NONBLOCK`` and waited on
with the hub's I/O watcher under a deadline.  Regular files are read in the
hub's thread pool: a procfs read runs the script's ``prometheus`` probe in the
kernel and may take a while for large arrays.

Directories are parameters, so tests point them at a fixture tree.
"""

import logging
import os
import stat
import time
from typing import Callable, Iterable, List, Optional, Tuple

import gevent
import gevent.event
from gevent.socket import wait_read

from .. import trust
from .declarations import Annotator

log = logging.getLogger("stap-exporter")

OUTPUT_NAME = "__prometheus"

# Upper bound on one script's output.  The kernel runtime caps it at 64 KiB;
# the BPF runtime has no cap, so keep a generous one that still bounds memory.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

_READ_CHUNK = 65536


class OutputError(Exception):
    """The output exists but could not be read (reason in the message)."""


class OutputTimeout(OutputError):
    """No complete output arrived before the deadline."""


class OutputTooLarge(OutputError):
    """The output exceeded the size limit."""


class UntrustedOutput(OutputError):
    """The output, or a directory on its way, is not trusted: see trust.py.
    The message names the path and the reason."""


class Location:
    """Where a module's output was found: ``ROOT/MODULE/__prometheus``."""

    __slots__ = ("root", "module", "path")

    def __init__(self, root: str, module: str):
        self.root = root
        self.module = module
        self.path = os.path.join(root, module, OUTPUT_NAME)

    def __str__(self):
        return self.path


def find_output(module: str, dirs: Iterable[str]) -> Optional[Location]:
    """Where MODULE's output is, in the first of DIRS that has it, or None
    when no runtime has created it (yet).  Nothing is followed or trusted
    here: read_output checks the whole way before it reads."""
    for directory in dirs:
        location = Location(directory, module)
        try:
            os.lstat(location.path)
        except OSError:
            continue
        return location
    return None


def module_dirs(module: str, dirs: Iterable[str]) -> List[str]:
    """Every existing ``DIR/MODULE`` entry, link or not (for clean-up after
    a stop; trust.remove_tree refuses what is not ours)."""
    found = []
    for d in dirs:
        path = os.path.join(d, module)
        try:
            os.lstat(path)
        except OSError:
            continue
        found.append(path)
    return found


# How an output refusal reads (the path, then trust's reason).
_REFUSED_OUTPUT = "refused to read %s: %s"


def output_refusal(location: Location) -> Optional[str]:
    """None if LOCATION's output may be read, else the refusal as read_output
    would raise it; nothing is opened (trust.output_refusal).  Raises
    FileNotFoundError or OSError."""
    refusal = trust.output_refusal(location.root, location.module, OUTPUT_NAME)
    return refusal and _REFUSED_OUTPUT % (location.path, refusal)


def _open(location: Location) -> Tuple[int, os.stat_result]:
    """The trusted, non-blocking open of LOCATION (trust.open_output), with
    its refusals as UntrustedOutput."""
    try:
        return trust.open_output(location.root, location.module, OUTPUT_NAME)
    except trust.Untrusted as exc:
        raise UntrustedOutput(_REFUSED_OUTPUT % (location.path, exc)) from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise OutputError("cannot open output %s: %s" % (location.path, exc.strerror)) from None


def read_output(location: Location, timeout: float,
                max_bytes: int = DEFAULT_MAX_BYTES,
                clock: Callable[[], float] = time.monotonic) -> bytes:
    """Read the whole output at LOCATION within TIMEOUT seconds.

    Returns the bytes exactly as the runtime produced them (possibly empty for
    a regular file).  Raises FileNotFoundError when it is gone,
    UntrustedOutput when it (or a directory on its way) is not trusted,
    OutputTimeout when the deadline passes, OutputTooLarge beyond MAX_BYTES,
    and OutputError for other I/O errors.
    """
    deadline = clock() + timeout
    fd, st = _open(location)
    if stat.S_ISFIFO(st.st_mode):
        return _read_fifo(location, fd, deadline, max_bytes, clock)
    return _read_file_in_thread(location.path, fd, deadline, max_bytes, clock)


def _collect(chunks: List[bytes], data: bytes, total: int, max_bytes: int) -> int:
    """Append DATA to CHUNKS; the new total.  Raises OutputTooLarge beyond
    MAX_BYTES."""
    chunks.append(data)
    total += len(data)
    if total > max_bytes:
        raise OutputTooLarge("output larger than %d bytes" % max_bytes)
    return total


def _read_file(fd: int, max_bytes: int) -> bytes:
    chunks = []
    total = 0
    with open(fd, "rb", buffering=0, closefd=True) as f:
        while True:
            # procfs files may return short reads: keep going to end-of-file.
            data = f.read(min(4 * _READ_CHUNK, max_bytes + 1 - total))
            if not data:
                return b"".join(chunks)
            total = _collect(chunks, data, total, max_bytes)


def _read_file_in_thread(path, fd, deadline, max_bytes, clock) -> bytes:
    pool = gevent.get_hub().threadpool
    job = pool.spawn(_read_file, fd, max_bytes)
    remaining = deadline - clock()
    try:
        return job.get(timeout=max(remaining, 0.0))
    except gevent.Timeout:
        raise OutputTimeout("reading output took longer than the deadline") from None
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError("cannot read output %s: %s" % (path, exc.strerror)) from None


# Pause between attempts when a FIFO reader saw end-of-file with no data: it
# opened between two of stapbpf's write cycles, or the script has nothing to
# say yet (a timer script's arrays stay empty until the timer first fires).
# A quarter of the time waited so far, from 5 ms up to 0.1 s: while a reader
# holds the FIFO open, stapbpf with nothing to write reopens it in a tight
# loop, so frequent empty reads cost the loaders CPU (measured: a flat 25 ms
# got 20 timer scripts loaded at once their first metrics about 0.2 s later),
# while long pauses early leave data unread (doubling pauses of 5, 10, 20,
# 40 and 80 ms read a 100 ms timer's first tick ~55 ms late; this schedule
# took bench/lean.py's first metrics from 0.28 to 0.23 s for one script and
# from 0.17 to 0.12 s for a kept module).
_EMPTY_RETRY_PAUSE = 0.005
_EMPTY_RETRY_PAUSE_MAX = 0.1


def empty_retry_pause(waited: float) -> float:
    """The pause after an empty FIFO cycle, WAITED seconds into a read."""
    return min(_EMPTY_RETRY_PAUSE_MAX, max(_EMPTY_RETRY_PAUSE, waited / 4))


def _read_fifo(location, fd, deadline, max_bytes, clock) -> bytes:
    """Read cycles of the FIFO (FD: the first open of it) until one gives
    data; each retry opens it afresh, checked again."""
    began = clock()
    while True:
        data = _read_fifo_once(fd, deadline, max_bytes, clock)
        if data:
            return first_cycle(data)
        now = clock()
        remaining = deadline - now
        if remaining <= 0:
            raise OutputTimeout("the script wrote no output before the deadline")
        gevent.sleep(min(empty_retry_pause(now - began), remaining))
        fd, st = _open(location)
        if not stat.S_ISFIFO(st.st_mode):
            os.close(fd)
            raise OutputError("output %s changed from a FIFO to a file" % location.path)


def _read_fifo_once(fd, deadline, max_bytes, clock) -> bytes:
    """One write cycle from FD (closed on return)."""
    chunks = []
    total = 0
    try:
        while True:
            # Linux reports a FIFO readable only once a writer has connected
            # since we opened it, so this waits for the runtime's next cycle.
            remaining = deadline - clock()
            if remaining <= 0:
                raise _WaitTimeout()
            wait_read(fd, timeout=remaining, timeout_exc=_WaitTimeout)
            while True:
                try:
                    data = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    break  # writer connected but paused: wait again
                except OSError as exc:
                    raise OutputError("cannot read output FIFO: %s" % exc.strerror) from None
                if not data:
                    return b"".join(chunks)
                total = _collect(chunks, data, total, max_bytes)
    except _WaitTimeout:
        raise OutputTimeout("the script's output FIFO got no writer before the deadline"
                            if not chunks else
                            "the script stalled while writing output") from None
    finally:
        os.close(fd)


class _WaitTimeout(Exception):
    pass


def first_cycle(data: bytes) -> bytes:
    """DATA cut before the start of a second write cycle, if it holds one.

    The runtime writes a complete text per reader, closes, and reopens.  A
    reader that is slow to see the end-of-file (a busy exporter) finds the
    next cycle's text appended.  In valid exposition text a series appears
    only once, so the first sample's series reappearing marks the next
    cycle."""
    start = 0
    while data.startswith(b"#", start):  # skip leading comments
        start = data.find(b"\n", start) + 1
        if start == 0:
            return data
    end = data.find(b"\n", start)
    if end < 0:
        return data
    line = data[start:end]
    brace = line.find(b"}")
    if brace >= 0:
        key = line[:brace + 1]
    else:
        space = line.find(b" ")
        if space <= 0:
            return data
        key = line[:space]
    again = data.find(b"\n" + key + b" ", end)
    return data[:again + 1] if again >= 0 else data


def count_samples(data: bytes) -> int:
    """The samples of DATA, a text ending with a newline: its lines that are
    neither empty nor comments.  Counted with ``bytes.count`` (microseconds
    for a large body; a text without a '#' is not searched for comments);
    only a text with empty lines is split."""
    samples = data.count(b"\n")
    if b"#" in data:
        samples -= data.count(b"\n#") + data.startswith(b"#")
    if b"\n\n" in data or data.startswith(b"\n"):
        samples -= data.split(b"\n")[:-1].count(b"")
    return samples


# How long a read that ended without a final newline waits to see whether
# the script died while writing.
EXIT_NOTICE = 0.05


class OutputReader:
    """The output of one script's runs."""

    def __init__(self, name: str, module: str, procfs_dirs: List[str], max_output: int,
                 clock: Callable[[], float], read=read_output):
        self.name = name
        self.module = module
        self.procfs_dirs = procfs_dirs
        self.max_output = max_output
        self._clock = clock
        self._read = read
        self.path: Optional[str] = None
        self.annotator: Optional[Annotator] = None
        self.last_output_bytes = 0
        self.last_series = 0        # samples in the last output read
        self.read_this_run = False  # the current run's output has been read
        self._flight: Optional[gevent.event.AsyncResult] = None
        self._utf8_warned = False

    def new_run(self) -> None:
        """A new process starts: its output is elsewhere until found, and
        its first invalid UTF-8 is worth a warning again."""
        self.path = None
        self.read_this_run = False
        self._utf8_warned = False

    @property
    def in_flight(self) -> Optional[gevent.event.AsyncResult]:
        """The read under way (ready once it is done), or None."""
        return self._flight

    def locate(self) -> Optional[str]:
        """The output's path, looked up while unknown; None if none yet."""
        if self.path is None:
            self.path = find_output(self.module, self.procfs_dirs)
        return self.path

    def appeared(self) -> Tuple[bool, Optional[str]]:
        """(whether the output exists, why it may not be read or None).
        Only metadata is looked at (``output_refusal``): a FIFO is not
        opened, so its writer is not woken."""
        location = self.locate()
        if location is None:
            return False, None
        try:
            return True, output_refusal(location)
        except OSError:  # gone again, or not checkable now: look again later
            self.path = None
            return False, None

    def read(self, timeout: float, run) -> bytes:
        """Read the output of RUN (a ``process.Process``, or None) within
        TIMEOUT, sharing one read among concurrent callers (single-flight):
        reads of one script are serialized, and a FIFO never sees two
        readers at once.  A shared read runs on its first caller's deadline;
        a caller whose own deadline is later and whose shared read timed out
        reads again.  Raises what ``read_output`` raises."""
        deadline = self._clock() + timeout
        while True:
            flight = self._flight
            if flight is None:
                return self._read_once(max(0.0, deadline - self._clock()), run)
            try:
                return flight.get(timeout=max(0.0, deadline - self._clock()))
            except gevent.Timeout:
                raise OutputTimeout("timed out waiting for the script's output") from None
            except OutputTimeout:
                if deadline - self._clock() <= 0:
                    raise

    def _read_once(self, timeout: float, run) -> bytes:
        flight = self._flight = gevent.event.AsyncResult()
        try:
            data = self._read(self.path, timeout, self.max_output, self._clock)
            if self._died_while_writing(data, run):
                raise OutputError("the script exited while writing its output")
            data = self._finish(data, run.pid if run is not None else None)
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, Exception)
                                 else OutputError("read aborted"))
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
        if not data or data.endswith(b"\n"):
            return run.exited()
        run.result.wait(EXIT_NOTICE)
        return run.exited_unreaped()

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
        self.last_series = count_samples(data)
        self.read_this_run = True
        return data
