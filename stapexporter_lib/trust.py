"""Which paths a root daemon may trust, and how to use them without races.

A path is trusted when every directory on the way to it, and the file
itself, is owned by root or by the exporter's effective user and cannot be
written by group or others -- the rule of sshd's StrictModes, cron and
logrotate.  A directory above the trusted root (``--procfs-dirs`` entry,
scripts directory) may also be a root-owned sticky directory such as
``/tmp``: others can add entries there but cannot rename or remove ours.

Checks are made on file descriptors, never on names that could change
between check and use (systemd's ``chase()``): paths are walked component by
component with ``openat(O_PATH | O_NOFOLLOW)``, ``fstat`` tells what was
really opened, and a file is only opened for reading after its type and
owner were checked on an ``O_PATH`` descriptor (a device is never opened).
Clean-up removes trees through directory descriptors, iteratively, without
following any link and with a bound on its work.

Owns those checks and the tree removal.  Must not know about sessions, HTTP
or logging.  Everything here may block briefly on file-system
metadata calls, as ``os.stat`` does.  Its descriptors are closed with the real
close(2), never gevent's deferred one: the hub never watches them.
"""

import errno
import os
import pwd
import stat
from typing import List, Optional, Tuple

try:
    from gevent.monkey import get_original
except ImportError:  # used without gevent (tools, tests): nothing is patched
    def get_original(_module: str, name: str):
        return getattr(os, name)

# The real close(2).  gevent (25.8.1 and later) patches os.close to close
# anything but a regular file later, from a hub check watcher, in case the
# hub still watches it; a directory descriptor then stays open until the hub
# next runs its check watchers, which an idle or busy hub may put off
# indefinitely (the walks here leaked whole chains of O_PATH descriptors).
# The descriptors opened here are never watched by the hub: close them now.
# compiled.py closes its directory descriptors with it too.
close_now = get_original("os", "close")

# The most entries one tree removal touches before giving up: a tree that
# keeps growing under us (a runaway script) cannot keep clean-up busy forever.
MAX_REMOVE_OPERATIONS = 1_000_000

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# How often a replaced output file is checked again before it is refused.
OPEN_ATTEMPTS = 5
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TYPE_NAMES = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISREG, "a regular file"))


class Untrusted(Exception):
    """PATH may not be used; REASON says why (owner, mode, symlink, type)."""

    def __init__(self, path: str, reason: str):
        super().__init__("%s %s" % (path, reason))
        self.path = path
        self.reason = reason


def trusted_uids() -> Tuple[int, ...]:
    """Owners we trust: root and the user we run as."""
    return tuple(sorted({0, os.geteuid()}))


def describe_owner(uid: int) -> str:
    try:
        return "uid %d (%s)" % (uid, pwd.getpwuid(uid).pw_name)
    except KeyError:
        return "uid %d" % uid


def type_name(mode: int) -> str:
    for test, name in _TYPE_NAMES:
        if test(mode):
            return name
    return "not a regular file"


def owner_problem(st: os.stat_result) -> Optional[str]:
    """Why ST's owner is not trusted, or None."""
    if st.st_uid not in trusted_uids():
        return "is owned by %s, not by root or the exporter's user" % describe_owner(st.st_uid)
    return None


def mode_problem(st: os.stat_result, allow_sticky: bool = False) -> Optional[str]:
    """Why ST's mode lets others change it, or None.  ALLOW_STICKY accepts a
    root-owned sticky directory (/tmp): others cannot rename our entries."""
    if not st.st_mode & _WRITABLE_BY_OTHERS:
        return None
    if allow_sticky and st.st_mode & stat.S_ISVTX and st.st_uid == 0 \
            and stat.S_ISDIR(st.st_mode):
        return None
    return "is writable by %s (mode %04o)" % (
        "group and others" if st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IWOTH
        else "group" if st.st_mode & stat.S_IWGRP else "others",
        stat.S_IMODE(st.st_mode))


def check_stat(path: str, st: os.stat_result, allow_sticky: bool = False) -> None:
    """Raise Untrusted if ST (of PATH) has an untrusted owner or mode."""
    problem = owner_problem(st) or mode_problem(st, allow_sticky)
    if problem:
        raise Untrusted(path, problem)


def _open_component(dir_fd: int, name: str, path: str, flags: int) -> int:
    """openat(DIR_FD, NAME) without following a link; a link is Untrusted."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                mode = os.lstat(name, dir_fd=dir_fd).st_mode
            except OSError:
                raise exc from None
            if stat.S_ISLNK(mode):
                raise Untrusted(path, "is a symbolic link") from None
            raise Untrusted(path, "is %s, not a directory" % type_name(mode)) from None
        raise


def open_trusted_dir(path: str) -> int:
    """An O_PATH descriptor of the directory PATH, walked from / component by
    component without following links (links above PATH's own name are
    resolved first: the chain they resolve to is what gets checked).

    Every ancestor must be trusted or a root-owned sticky directory, and PATH
    itself trusted.  Raises Untrusted, or OSError (e.g. FileNotFoundError)."""
    path = os.path.abspath(path)
    parent = os.path.realpath(os.path.dirname(path))
    parts = [p for p in parent.split(os.sep) if p]
    fd = os.open("/", _PATH_FLAGS | os.O_DIRECTORY)
    try:
        check_stat("/", os.fstat(fd), allow_sticky=True)
        walked = ""
        names = parts + [os.path.basename(path)] if os.path.basename(path) else parts
        for i, name in enumerate(names):
            walked += os.sep + name
            last = i == len(names) - 1
            child = _open_component(fd, name, walked, _PATH_FLAGS | os.O_DIRECTORY)
            close_now(fd)
            fd = child
            check_stat(walked, os.fstat(fd), allow_sticky=not last)
        return fd
    except BaseException:
        close_now(fd)
        raise


def dir_refusal(path: str) -> Optional[str]:
    """None if the directory PATH is trusted, else the reason (naming the
    offending path); a missing PATH is not refused."""
    try:
        close_now(open_trusted_dir(path))
    except Untrusted as exc:
        return str(exc)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "%s cannot be checked: %s" % (path, exc.strerror)
    return None


def _probe_output(root: str, module: str, name: str) -> Tuple[int, os.stat_result, str]:
    """The checks of open_output without the opening: (O_PATH descriptor of
    the trusted MODULE directory, fstat of NAME taken on an O_PATH descriptor,
    NAME's path).  The caller closes the descriptor.  Raises Untrusted,
    FileNotFoundError or OSError."""
    root_fd = open_trusted_dir(root)
    try:
        mod_path = os.path.join(root, module)
        mod_fd = _open_component(root_fd, module, mod_path, _PATH_FLAGS | os.O_DIRECTORY)
    finally:
        close_now(root_fd)
    try:
        check_stat(mod_path, os.fstat(mod_fd))
        path = os.path.join(mod_path, name)
        return mod_fd, _checked_output_stat(mod_fd, name, path), path
    except BaseException:
        close_now(mod_fd)
        raise


def output_refusal(root: str, module: str, name: str) -> Optional[str]:
    """None if open_output would open ROOT/MODULE/NAME, else why not.  Nothing
    is opened for reading (an open wakes a FIFO's writer), so this may be
    asked at any time.  Raises FileNotFoundError or OSError."""
    try:
        close_now(_probe_output(root, module, name)[0])
    except Untrusted as exc:
        return str(exc)
    return None


def open_output(root: str, module: str, name: str) -> Tuple[int, os.stat_result]:
    """Open ROOT/MODULE/NAME for reading, non-blocking, if it is trusted.

    ROOT is walked as by open_trusted_dir, MODULE must be a trusted directory
    (not a link), and NAME a regular file or FIFO owned by a trusted user; its
    type is checked on an O_PATH descriptor before it is opened, so a device
    is never opened.  Returns (fd, fstat of fd).  Raises Untrusted,
    FileNotFoundError or OSError."""
    mod_fd, st, path = _probe_output(root, module, name)
    try:
        # A writer that replaces the file (write and rename) between the
        # check and the open is no attack: check the new one.  Only a file
        # that keeps changing under us is refused.
        for _ in range(OPEN_ATTEMPTS):
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=mod_fd)
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino):
                return fd, opened
            close_now(fd)
            st = _checked_output_stat(mod_fd, name, path)
        raise Untrusted(path, "was replaced while it was being opened, %d times"
                        % OPEN_ATTEMPTS)
    finally:
        close_now(mod_fd)


def _checked_output_stat(mod_fd: int, name: str, path: str) -> os.stat_result:
    """The fstat of NAME in MOD_FD, opened O_PATH (a device is never opened):
    a regular file or FIFO owned by a trusted user, else Untrusted."""
    probe = os.open(name, _PATH_FLAGS, dir_fd=mod_fd)
    try:
        st = os.fstat(probe)
    finally:
        close_now(probe)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise Untrusted(path, "is %s, not a regular file or FIFO" % type_name(st.st_mode))
    problem = owner_problem(st)
    if problem:
        raise Untrusted(path, problem)
    return st


# The largest script file read (digest, declarations, the copy that runs).
MAX_SCRIPT_BYTES = 4 * 1024 * 1024
# The most symbolic links followed on the way to a script (the kernel's own
# limit is 40).
MAX_LINKS = 40


def script_refusal(path: str) -> Optional[str]:
    """None if the script file PATH may run as root, else why not, naming
    the component at fault (``read_script``'s checks, without reading)."""
    try:
        close_now(_walk_script(path)[0])
    except Untrusted as exc:
        return str(exc)
    except FileNotFoundError:
        return "%s does not exist" % path
    except OSError as exc:
        return "%s cannot be checked: %s" % (path, exc.strerror)
    return None


def read_script(path: str, check: bool = True) -> Tuple[bytes, os.stat_result]:
    """The content and fstat of the script file PATH, read through
    descriptors once every component on the way was checked.

    Every directory passed through, every symbolic link followed (each is
    resolved here, one component at a time, never by the kernel) and the
    file itself must be owned by root or the exporter's user and not be
    writable by group or others; a directory above the file's own may be a
    root-owned sticky directory.  The file must be a regular file of at
    most MAX_SCRIPT_BYTES.  What was checked is what is returned: the
    caller digests, parses and runs these bytes, never the path again.
    CHECK=False (--insecure-scripts) skips the owner and mode checks, not
    the walk.  Raises Untrusted (naming the component), FileNotFoundError
    or OSError."""
    dir_fd, name, shown, _st = _walk_script(path, check)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    finally:
        close_now(dir_fd)
    try:
        st = os.fstat(fd)
        _check_script_stat(shown, st, check)  # the file opened, not the name looked at
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, MAX_SCRIPT_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_SCRIPT_BYTES:
                raise Untrusted(shown, "is larger than %d bytes" % MAX_SCRIPT_BYTES)
        return b"".join(chunks), st
    finally:
        close_now(fd)


def _check_script_stat(shown: str, st: os.stat_result, check: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Untrusted(shown, "is %s, not a regular file" % type_name(st.st_mode))
    if check:
        check_stat(shown, st)


def _walk_script(path: str, check: bool = True) -> Tuple[int, str, str, os.stat_result]:
    """(O_PATH descriptor of the directory holding the script's file, the
    file's name there, its path as walked, its lstat), every component on
    the way checked (``read_script``).  The caller closes the descriptor."""
    pending = [p for p in os.path.abspath(path).split(os.sep) if p]
    fd = os.open("/", _PATH_FLAGS | os.O_DIRECTORY)
    walked = "/"
    links = 0
    try:
        if check:
            check_stat("/", os.fstat(fd), allow_sticky=True)
        while True:
            if not pending:
                raise Untrusted(path, "is a directory, not a regular file")
            name = pending.pop(0)
            if name == ".":
                continue
            here = os.path.join(walked, name)
            if name == "..":
                child = os.open("..", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                here = os.path.dirname(walked) or "/"
                st = os.fstat(child)
            else:
                st = os.lstat(name, dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    # The directory holding the link was checked, so the
                    # link cannot change under us; its owner must be trusted
                    # like any other component.
                    links += 1
                    if links > MAX_LINKS:
                        raise Untrusted(path, "passes through more than %d symbolic links"
                                        % MAX_LINKS)
                    problem = check and owner_problem(st)
                    if problem:
                        raise Untrusted(here, "(a symbolic link on the way to %s) %s"
                                        % (path, problem))
                    target = os.readlink(name, dir_fd=fd)
                    pending = [p for p in target.split(os.sep) if p] + pending
                    if target.startswith(os.sep):
                        close_now(fd)
                        fd = os.open("/", _PATH_FLAGS | os.O_DIRECTORY)
                        walked = "/"
                    continue
                if not pending:
                    _check_script_stat(here if here == path else "%s (reached through %s)"
                                       % (here, path), st, check)
                    return fd, name, here, st
                if not stat.S_ISDIR(st.st_mode):
                    raise Untrusted(here, "is %s, not a directory" % type_name(st.st_mode))
                child = os.open(name, _PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                st = os.fstat(child)
            close_now(fd)
            fd = child
            walked = here
            if check:
                # Only the file's own directory must be closed to others:
                # above it a root-owned sticky directory (/tmp) lets nobody
                # rename or remove our entries.
                last_dir = len(pending) == 1
                check_stat(here, st, allow_sticky=not last_dir)
    except BaseException:
        close_now(fd)
        raise


def remove_tree(path: str, limit: int = MAX_REMOVE_OPERATIONS) -> None:
    """Remove the directory PATH and everything in it, without following any
    link, iteratively (any depth), touching only directories owned by a
    trusted user, and at most LIMIT entries.

    PATH's parent is opened as given; PATH itself and everything below are
    reached through directory descriptors only.  Raises FileNotFoundError if
    PATH is gone, Untrusted for a link or a foreign directory (nothing of it
    is removed then, or nothing more), OSError otherwise."""
    parent_fd = os.open(os.path.dirname(os.path.abspath(path)),
                        os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_tree_at(parent_fd, os.path.basename(path), path, limit)
    finally:
        close_now(parent_fd)


def _open_owned_dir(dir_fd: int, name: str, path: str) -> Tuple[int, Tuple[int, int]]:
    fd = _open_component(dir_fd, name, path, _DIR_FLAGS)
    st = os.fstat(fd)
    problem = owner_problem(st)
    if problem:
        close_now(fd)
        raise Untrusted(path, problem)
    return fd, (st.st_dev, st.st_ino)


def _remove_tree_at(parent_fd: int, name: str, path: str, limit: int) -> None:
    # Only the current directory is open: going back up opens ".." and
    # checks it is the directory we came from, so depth costs no descriptors
    # and no recursion.
    cur, ident = _open_owned_dir(parent_fd, name, path)
    names: List[str] = []
    idents = [ident]
    budget = [limit, limit]  # [left, limit]
    try:
        while True:
            sub = _clear_files(cur, path, names, budget)
            if sub is not None:
                child, child_ident = _open_owned_dir(
                    cur, sub, os.path.join(path, *names, sub))
                close_now(cur)
                cur = child
                names.append(sub)
                idents.append(child_ident)
                continue
            if not names:
                break
            up = os.open("..", _DIR_FLAGS, dir_fd=cur)
            upst = os.fstat(up)
            if (upst.st_dev, upst.st_ino) != idents[-2]:
                close_now(up)
                raise Untrusted(os.path.join(path, *names), "was moved during clean-up")
            close_now(cur)
            cur = up
            idents.pop()
            os.rmdir(names.pop(), dir_fd=cur)
    finally:
        close_now(cur)
    os.rmdir(name, dir_fd=parent_fd)


def _clear_files(dir_fd: int, path: str, names: List[str], budget: List[int]) -> Optional[str]:
    """Unlink every non-directory in DIR_FD; return the name of a
    subdirectory still to be removed, or None when the directory is empty."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            budget[0] -= 1
            if budget[0] < 0:
                raise OSError(errno.E2BIG, "more than %d entries" % budget[1],
                              os.path.join(path, *names))
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
    return None
