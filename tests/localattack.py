"""Helpers for tests that attack the daemon as a real unprivileged local user.

``Attacker`` creates a Unix account with a name unique to this test run and
removes it again (``userdel -r``) even when the test fails.  ``shared_dir``
makes a root-owned directory in /tmp that the attacker can enter (the
pytest tmp_path tree is private to root), removed afterwards.  ``Secret`` is
a root-only file with a unique marker that must never reach a response body
or a log line.
"""

import ctypes
import ctypes.util
import itertools
import os
import shutil
import struct
import subprocess
import tempfile
import uuid

import pytest

_counter = itertools.count()


class Attacker:
    def __init__(self):
        self.name = "stxa%d_%d" % (os.getpid(), next(_counter))
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", self.name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import pwd
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def run(self, *cmd, check=True):
        """Run CMD as the attacker; returns the CompletedProcess."""
        proc = subprocess.run(["runuser", "-u", self.name, "--"] + list(cmd),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError("as %s: %s failed: %s" % (self.name, cmd, proc.stderr))
        return proc

    def sh(self, script, check=True):
        return self.run("sh", "-c", script, check=check)

    def remove(self):
        subprocess.run(["userdel", "-r", self.name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        # userdel leaves files the account owned elsewhere; so does the group
        # when another account uses it (none here).
        subprocess.run(["groupdel", self.name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def shared_dir(prefix="stap-trust-test."):
    """A root-owned sticky directory in /tmp that other users can write, like
    /tmp and /var/tmp themselves."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o1777)
    return d


def remove_shared(path):
    """Remove a test's shared directory, whatever others put in it."""
    subprocess.run(["rm", "-rf", "--one-file-system", path], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


class Secret:
    """A root-only file holding a unique marker."""

    def __init__(self, directory):
        self.marker = "SECRET-%s" % uuid.uuid4().hex
        self.path = os.path.join(str(directory), "secret")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write('root_password{x="%s"} 1\n' % self.marker)

    def assert_not_in(self, *texts):
        for text in texts:
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            assert self.marker not in text, "the secret leaked: %r" % text[:500]


class OpenWatch:
    """inotify IN_OPEN on one path: tells whether anything opened it (O_PATH
    opens are not reported, real opens are)."""

    IN_OPEN = 0x20
    IN_NONBLOCK = 0o4000

    def __init__(self, path):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0, "inotify_init1 failed"
        wd = libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN)
        assert wd >= 0, "inotify_add_watch(%s) failed" % path

    def opened(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        mask = struct.unpack_from("iIII", data)[1]
        return bool(mask & self.IN_OPEN)

    def close(self):
        os.close(self.fd)


@pytest.fixture
def attacker():
    """A real unprivileged account, removed afterwards."""
    a = Attacker()
    yield a
    a.remove()


@pytest.fixture
def shared():
    """A sticky world-writable directory of the test's own in /tmp."""
    d = shared_dir()
    yield d
    remove_shared(d)
