"""Connection slots, end to end: clients that pipeline
requests and never read the answers can neither hold slots forever nor make
the exporter queue their input; well-behaved clients keep being served."""

import socket
import statistics
import threading
import time

from conftest import wait_for, write_script

INDEX = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
BIG = b"GET /big.stp HTTP/1.1\r\nHost: x\r\n\r\n"
ATTACK_BYTES = 6 * 1024 * 1024      # ~200,000 pipelined requests


class Attacker:
    """A connection that pipelines REQUEST as fast as the server takes
    them (~200,000 in all, then again) and never reads a byte of the
    answers.  ``blocked_since``: when the server last stopped taking them;
    ``error``: what ended the connection (reset by the server)."""

    def __init__(self, exp, stop, request=INDEX):
        self.stop = stop
        self.request = request
        self.blocked_since = None
        self.error = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((exp.host, exp.port))
        self.sock.setblocking(False)
        self.thread = threading.Thread(target=self._push, daemon=True)
        self.thread.start()

    def _push(self):
        data = self.request * (ATTACK_BYTES // len(self.request))
        view = memoryview(data)
        while not self.stop.is_set():
            try:
                view = view[self.sock.send(view):] or memoryview(data)
                self.blocked_since = None
            except BlockingIOError:
                if self.blocked_since is None:
                    self.blocked_since = time.monotonic()
                self.stop.wait(0.01)
            except OSError as exc:
                self.error = exc
                return

    def stalled_for(self, seconds):
        return self.blocked_since is not None and \
            time.monotonic() - self.blocked_since >= seconds

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _server_queues(port):
    """Recv-Q of the exporter's side of each established connection on PORT."""
    queues = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            if local_port == port and cols[3] == "01":     # ESTABLISHED
                queues.append(int(cols[4].split(":")[1], 16))
    return queues


def _accept_queue(port):
    """Connections waiting in the listening socket's accept queue."""
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":    # LISTEN
                return int(cols[4].split(":")[1], 16)
    raise AssertionError("no listening socket on port %d" % port)


def test_pipelining_clients_that_never_read_cannot_hold_the_slots(dirs, exporter_factory):
    """The audit's attack: ten connections pipeline ``GET /`` and never
    read, against --max-connections 10."""
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    exp = exporter_factory(["--max-connections", "10", "--send-timeout", "3"])
    exp.get_until("/quick.stp")
    stop = threading.Event()
    attackers = [Attacker(exp, stop) for _ in range(10)]
    try:
        # Their answers back up until the server stops reading from them.
        wait_for(lambda: all(a.stalled_for(0.5) or a.error for a in attackers), timeout=30,
                 message="the attackers to stall")
        # Nobody's pipelined input piles up in the exporter.
        queues = _server_queues(exp.port)
        assert queues and max(queues) <= 256 * 1024, queues
        _well_behaved_client_is_served(exp)
        # Each is dropped after reading nothing for --send-timeout.
        try:
            wait_for(lambda: all(a.error for a in attackers), timeout=15,
                     message="the server to drop every attacker")
        except AssertionError:
            raise AssertionError([a.error for a in attackers] + [exp.log_text()[-4000:]])
        assert all(isinstance(a.error, (ConnectionResetError, BrokenPipeError))
                   for a in attackers), [a.error for a in attackers]
        exp.wait_log(r'event=http client=127\.0\.0\.1:\d+ msg="dropped connection: read'
                     r' nothing for 3 s \(--send-timeout\)')
    finally:
        for a in attackers:
            a.close()
    _well_behaved_client_is_served(exp)
    assert "Traceback" not in exp.log_text()


def _well_behaved_client_is_served(exp, times=8):
    """Every request answered, promptly as a rule: a client kept waiting for
    a slot waits every time, while a busy machine can slow any one request."""
    took = []
    for _ in range(times):
        t0 = time.monotonic()
        r = exp.get("/quick.stp", timeout=5)
        assert r.status == 200, r
        took.append(time.monotonic() - t0)
    assert statistics.median(took) < 1.0, took


def test_stalled_connections_give_up_their_slots(dirs, exporter_factory):
    """Every slot is stuck sending a large answer nobody reads: a newcomer
    takes the slot of the connection stalled longest."""
    scripts, _ = dirs
    write_script(scripts, "quick.stp")
    write_script(scripts, "big.stp", "pad=3000000")
    exp = exporter_factory(["--max-connections", "10", "--send-timeout", "60"])
    exp.get_until("/quick.stp")
    exp.get_until("/big.stp")
    stop = threading.Event()
    attackers = [Attacker(exp, stop, BIG) for _ in range(10)]
    try:
        wait_for(lambda: all(a.stalled_for(1.5) for a in attackers), timeout=30,
                 message="the attackers to stall")
        _well_behaved_client_is_served(exp)
        exp.wait_log(r'event=http client=127\.0\.0\.1:\d+ msg="dropped connection: stalled'
                     r' sending for \d+\.\d s, its slot was needed \(--max-connections 10\)')
        wait_for(lambda: any(a.error for a in attackers), timeout=5,
                 message="the connection whose slot was taken to be reset")
    finally:
        for a in attackers:
            a.close()
    assert "Traceback" not in exp.log_text()


def test_a_full_server_closes_the_oldest_idle_connection(dirs, exporter_factory):
    exp = exporter_factory(["--max-connections", "3"])
    idle = []
    for _ in range(2):
        s = socket.create_connection((exp.host, exp.port), timeout=5)
        s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        idle.append(s)
        time.sleep(0.05)
    idle.append(socket.create_connection((exp.host, exp.port), timeout=5))  # says nothing
    try:
        wait_for(lambda: _accept_queue(exp.port) == 0, timeout=5,
                 message="the exporter to accept the silent connection")
        # All three slots taken: the newcomer is served at once, told that
        # this is the last answer on its connection...
        r = exp.get("/-/healthy")
        assert r.status == 200 and r.header("Connection") == "close", r.headers
        # ...and the connection idle longest was closed between requests,
        # with nothing sent on it; the others are still served.
        idle[0].settimeout(5)
        assert idle[0].recv(65536) == b""
        for s in idle[1:]:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        exp.wait_log(r'msg="closed idle connection: idle for \d+\.\d s, its slot was needed')
    finally:
        for s in idle:
            s.close()
