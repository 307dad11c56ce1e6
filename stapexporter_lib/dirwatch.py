"""Knowing at once when a file is finished in a directory (Linux inotify).

A chained compile's shell becomes the loader on its own, and leaves a marker
file in its working directory saying which module it loads
(``loaders.CHAIN_SCRIPT``); the exporter learns of it from here, to count
the run as a load from then on and to keep the module in its cache.
``DirWatch`` tells the watchdog the moment a name is completed in a
directory: closed after writing (``IN_CLOSE_WRITE``), as the shell writes
its marker.  Names renamed into it do not count (stap renames its module
into place on every compile: nobody waits for that).  One inotify instance
serves the whole exporter (one watch per watched directory) and is read from
a hub callback, without blocking and without a greenlet of its own.  Where
inotify cannot be had (another kernel, or the per-user limits reached),
``watch`` returns None and callers look for the file themselves.

Owns the inotify descriptor and its watches.  Must not decide what a
completed name means (``launch.py``) or signal processes (``child.py``).
"""

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from typing import Dict, Optional, Set

import gevent
import gevent.event

from .trust import close_now

log = logging.getLogger("stap-exporter")

# From <sys/inotify.h>.
IN_CLOSE_WRITE = 0x00000008
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then LEN bytes of name
_READ_SIZE = 65536

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _init1, _add_watch, _rm_watch = (_libc.inotify_init1, _libc.inotify_add_watch,
                                     _libc.inotify_rm_watch)
    _add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
except (OSError, AttributeError):  # not Linux/glibc: no early news
    _init1 = None


class Watch:
    """One watched directory: EVENT is set whenever a name in it is
    completed (the waiter clears it); ``completed`` says which."""

    def __init__(self, owner: "DirWatch", wd: int):
        self._owner = owner
        self.wd = wd
        self.event = gevent.event.Event()
        self.names: Set[str] = set()

    def completed(self, name: str) -> bool:
        """NAME was closed after writing in the directory."""
        return name in self.names

    def close(self) -> None:
        self._owner.unwatch(self)


class DirWatch:
    """The exporter's inotify instance, opened on first use."""

    def __init__(self):
        self._fd: Optional[int] = None
        self._io = None
        self._watches: Dict[int, Watch] = {}
        self._broken = _init1 is None

    def watch(self, directory: str) -> Optional[Watch]:
        """A watch on DIRECTORY (not a link to one), or None when inotify
        is not available."""
        if not self._open():
            return None
        wd = _add_watch(self._fd, os.fsencode(directory),
                        IN_CLOSE_WRITE | IN_ONLYDIR | IN_DONT_FOLLOW)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:  # fs.inotify.max_user_watches reached
                log.debug("dirwatch: no inotify watch left for %s", directory)
            return None
        watch = self._watches[wd] = Watch(self, wd)
        return watch

    def unwatch(self, watch: Watch) -> None:
        if self._watches.get(watch.wd) is watch:
            del self._watches[watch.wd]
            _rm_watch(self._fd, watch.wd)  # the directory may be gone already: no matter

    def _open(self) -> bool:
        if self._fd is not None or self._broken:
            return not self._broken
        fd = _init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            self._broken = True
            log.info("dirwatch: inotify not available (%s); compiles are followed to"
                     " their exit", os.strerror(ctypes.get_errno()))
            return False
        self._fd = fd
        self._io = gevent.get_hub().loop.io(fd, 1)
        self._io.start(self._readable)
        return True

    def _readable(self) -> None:
        """In the hub: read what is there (never blocks: non-blocking fd)."""
        try:
            data = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("dirwatch: cannot read inotify events: %s", exc.strerror)
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset:offset + length].rstrip(b"\0")
            offset += length
            if mask & IN_Q_OVERFLOW:  # events lost: everybody looks for themselves
                for watch in self._watches.values():
                    watch.event.set()
                continue
            watch = self._watches.get(wd)
            if watch is None:
                continue
            if mask & IN_IGNORED:  # the directory went away
                del self._watches[wd]
            elif name:
                watch.names.add(os.fsdecode(name))
            watch.event.set()

    def close(self) -> None:
        """Stop watching everything and close the descriptor."""
        if self._io is not None:
            self._io.stop()
            self._io = None
        if self._fd is not None:
            close_now(self._fd)
            self._fd = None
        self._watches.clear()


_shared: Optional[DirWatch] = None


def shared() -> DirWatch:
    """The exporter's one DirWatch (created on first use, in the hub's thread)."""
    global _shared
    if _shared is None:
        _shared = DirWatch()
    return _shared
