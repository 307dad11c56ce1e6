"""Abusive clients against the web side, end to end: clients that send their
headers slowly from many addresses, requests that exist to fill the log, and
another user taking the port while the exporter is down (socket activation).
(Wrong-password floods: test_auth_limits.py; that a verified password is
remembered however long they last: tests/unit/test_webconfig.py; the
deadline for dripped headers: tests/unit/test_http_server.py.)"""

import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest

from conftest import EXPORTER, Exporter, wait_for, write_script
from localattack import attacker  # noqa: F401  (a fixture)

LEGIT = "127.0.0.99"
SLOW_REQUEST = b"GET /quick.stp HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4096


def connect_from(exp, source, timeout=5.0):
    return socket.create_connection((exp.host, exp.port), timeout=timeout,
                                    source_address=(source, 0))


def get_from(exp, source, path, headers=None, timeout=5.0):
    """(status, body) of GET PATH on a new connection from SOURCE."""
    r = exp.get(path, headers=headers, timeout=timeout, source=source)
    return r.status, r.body


class SlowHeaders:
    """COUNT connections from each of SOURCES that send the first byte of a
    request at once and one more byte a second after that, and connect again
    whenever the server closes one."""

    def __init__(self, exp, sources, count):
        self.exp = exp
        self.sel = selectors.DefaultSelector()
        self.closed_by_server = 0
        self.stop = threading.Event()
        for source in sources:
            for _ in range(count):
                self._open(source)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self, source):
        try:
            s = connect_from(self.exp, source, timeout=2)
            s.send(SLOW_REQUEST[:1])
        except OSError:
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, [source, 1])

    def _run(self):
        next_drip = time.monotonic() + 1
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.1):
                try:
                    if key.fileobj.recv(65536):
                        continue        # a 408 or 503; the close follows
                except OSError:
                    pass
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                self.closed_by_server += 1
                self._open(key.data[0])
            if time.monotonic() >= next_drip:
                next_drip += 1
                for key in list(self.sel.get_map().values()):
                    sent = key.data[1]
                    try:
                        key.fileobj.send(SLOW_REQUEST[sent:sent + 1])
                        key.data[1] += 1
                    except OSError:
                        pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()


def test_slow_headers_from_many_addresses_do_not_starve_scrapes(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    exp = exporter_factory(["--max-connections", "64"])
    wait_for(lambda: get_from(exp, LEGIT, "/quick.stp")[0] == 200, message="first metrics")
    sources = ["127.0.0.%d" % i for i in range(1, 9)]
    flood = SlowHeaders(exp, sources, 24)          # three times the slots
    try:
        statuses = [get_from(exp, LEGIT, "/quick.stp")[0] for _ in range(30)]
        assert statuses == [200] * 30, statuses
        # The attackers did hold the slots: theirs were the ones taken.
        exp.wait_log(r'client=127\.0\.0\.[1-8]:\d+ msg="closed connection: sending its request'
                     r' for \d+\.\d s, its slot was needed \(--max-connections 64\)')
    finally:
        flood.close()
    assert "Traceback" not in exp.log_text()


def test_one_client_address_gets_at_most_its_share(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    exp = exporter_factory(["--max-connections-per-client", "5"])
    exp.get_until("/quick.stp")
    mine = []
    try:
        for _ in range(12):
            s = connect_from(exp, "127.0.0.5")
            s.send(SLOW_REQUEST[:1])
            mine.append(s)
        # Each connection beyond five cost the address one of its own: the
        # oldest, unless the server had not yet seen its first byte (then
        # the newcomer).
        sel = selectors.DefaultSelector()
        for s in mine:
            sel.register(s, selectors.EVENT_READ)
        closed = set()
        deadline = time.monotonic() + 5
        while len(closed) < 7 and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                if not _drain(key.fileobj):
                    closed.add(key.fileobj)
                    sel.unregister(key.fileobj)
        assert len(closed) == 7
        assert not sel.select(timeout=0.5), "more than seven closed"
        exp.wait_log(r'client=127\.0\.0\.5:\d+ msg="closed connection: sending its request for'
                     r' \d+\.\d s, its slot was needed \(--max-connections-per-client 5\)')
        # The address is still served (in place of one of its slow ones), and
        # another address is not affected at all.
        assert get_from(exp, "127.0.0.5", "/quick.stp")[0] == 200
        others = [connect_from(exp, "127.0.0.6") for _ in range(5)]
        mine += others
        assert get_from(exp, "127.0.0.7", "/quick.stp")[0] == 200
        for s in others:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in mine:
            s.close()


def _drain(sock):
    """Read what waits on SOCK; False once the server has closed it."""
    try:
        return bool(sock.recv(65536))
    except ConnectionResetError:
        return False


FLOODS = [
    (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "Invalid header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", "Request rejected"),
    (b"GET /targets HTTP/1.1\r\nHost: evil/x\r\nConnection: close\r\n\r\n",
     "refused Host header"),
]


@pytest.mark.parametrize("request_bytes,logged", FLOODS, ids=[f[1] for f in FLOODS])
def test_a_request_flood_logs_a_bounded_number_of_lines(dirs, exporter_factory, request_bytes,
                                                        logged):
    exp = exporter_factory()
    for _ in range(300):
        with socket.create_connection((exp.host, exp.port), timeout=5) as s:
            s.settimeout(5)
            try:
                s.sendall(request_bytes)
                while _drain(s):
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass
    # All answered; the log has caught up once a later request's line is in.
    assert exp.get("/sync-marker.stp").status == 404
    exp.wait_log(r"GET /sync-marker\.stp")
    lines = [line for line in exp.log_lines if logged in line and "event=access" not in line]
    # One line per ten seconds at most, however many requests.
    assert 1 <= len(lines) <= 3, lines[:5]
    assert "Traceback" not in exp.log_text()


# -- socket activation --------------------------------------------------------

# What systemd does between fork and exec for a socket-activated service.
ACTIVATE = """import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


def activated(fd, cmd):
    """CMD started with descriptor FD as 3, LISTEN_PID its own pid and
    LISTEN_FDS 1, as systemd starts a socket-activated service."""
    return [sys.executable, "-c", ACTIVATE, str(fd)] + list(cmd)


class ActivatedExporter(Exporter):
    """conftest's Exporter, started as systemd starts a socket-activated
    service: with the listening socket SOCK as descriptor 3."""

    def __init__(self, scripts, procfs, sock, **kw):
        real = subprocess.Popen
        fd = sock.fileno()

        def popen(cmd, **k):
            return real(activated(fd, cmd), pass_fds=(fd,), **k)
        with mock.patch.object(subprocess, "Popen", popen):
            super().__init__(scripts, procfs, **kw)


def _listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _inodes(pid):
    found = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            found.add(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    return found


def test_socket_activation_keeps_the_port_from_other_users(dirs, attacker):  # noqa: F811
    scripts, procfs = dirs
    write_script(scripts, "quick.stp")
    sock = _listening_socket()
    port = sock.getsockname()[1]
    try:
        for _ in range(2):      # a restart serves the same socket again
            exp = ActivatedExporter(scripts, procfs, sock)
            try:
                assert exp.port == port
                exp.wait_log(r"event=socket-activation .*--port and --listen are not used")
                assert exp.get_until("/quick.stp").status == 200
                (child,) = exp.settled_children(1)
                with open("/proc/%d/environ" % child, "rb") as f:
                    assert b"LISTEN_" not in f.read()
                listener = "socket:[%d]" % os.fstat(sock.fileno()).st_ino
                assert listener not in _inodes(child)
            finally:
                assert exp.stop() == 0
            # Down: the port is still taken, so no other user can serve on it.
            probe = attacker.run("/usr/bin/python3", "-c", (
                "import socket, sys\n"
                "for host in ('127.0.0.1', '0.0.0.0'):\n"
                "    s = socket.socket()\n"
                "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "    try:\n"
                "        s.bind((host, %d)); s.listen(); sys.exit('bound ' + host)\n"
                "    except OSError as exc:\n"
                "        print(exc.errno)\n") % port, check=False)
            assert probe.returncode == 0, probe.stderr
            assert probe.stdout.split() == [b"98", b"98"], probe.stdout    # EADDRINUSE
    finally:
        sock.close()


def _not_listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


@pytest.mark.parametrize("make", [
    lambda: open("/dev/null", "rb"),
    _not_listening,
    lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
], ids=["file", "not-listening", "udp"])
def test_socket_activation_refuses_what_is_not_a_listening_socket(dirs, make, tmp_path):
    scripts, procfs = dirs
    passed = make()
    try:
        fd = passed.fileno()
        proc = subprocess.run(activated(fd, [sys.executable, EXPORTER, "-s", str(scripts),
                                             "--procfs-dirs", str(procfs),
                                             "--cache-dir", str(tmp_path / "cache")]),
                              pass_fds=(fd,), capture_output=True, timeout=30)
    finally:
        passed.close()
    assert proc.returncode == 1, proc
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and re.match(
        r"stap-exporter: error: socket activation: descriptor 3 \(LISTEN_FDS\) is not a"
        r" listening TCP socket", lines[0]), lines
    assert not proc.stdout


def test_listen_variables_for_another_process_are_ignored(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    exp = exporter_factory(env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert exp.get_until("/quick.stp").status == 200
    assert "socket-activation" not in exp.log_text()
    (child,) = exp.settled_children(1)
    with open("/proc/%d/environ" % child, "rb") as f:
        assert b"LISTEN_" not in f.read()
