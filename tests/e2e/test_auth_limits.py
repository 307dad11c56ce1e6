"""Basic auth under attack, end to end: failed
logins cannot starve scrapes, and the time a failure takes does not tell
which user names exist."""

import base64
import contextlib
import email.utils
import glob
import http.client
import os
import re
import selectors
import socket
import statistics
import threading
import time

import bcrypt
import pytest

from conftest import wait_for, write_script

ATTACKERS = 200


def _basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def _web_config(tmp_path, users):
    """USERS: name -> (password, bcrypt cost)."""
    lines = ["basic_auth_users:"]
    for name, (password, cost) in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
        lines.append("  %s: '%s'" % (name, hashed))
    cfg = tmp_path / "web.yml"
    cfg.write_text("\n".join(lines) + "\n")
    return str(cfg)


class WrongPasswordFlood:
    """COUNT keep-alive connections, each sending the next request with a
    wrong password as soon as the previous one is answered (and connecting
    again when the server closes it)."""

    def __init__(self, exp, count=ATTACKERS):
        self.address = (exp.host, exp.port)
        self.statuses = {}
        self.stop = threading.Event()
        request = ("GET /quick.stp HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n\r\n"
                   % _basic("prom", "wrong")).encode()
        self.request = request
        self.sel = selectors.DefaultSelector()
        for _ in range(count):
            self._connect()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.1):
                buf = key.data
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()
                    self._connect()
                    continue
                buf += data
                self._answered(key.fileobj, buf)

    def _connect(self):
        try:
            s = socket.create_connection(self.address, timeout=5)
            s.setblocking(False)
            s.send(self.request)
        except OSError:
            return
        self.sel.register(s, selectors.EVENT_READ, bytearray())

    def _answered(self, sock, buf):
        while True:
            head, sep, rest = bytes(buf).partition(b"\r\n\r\n")
            m = re.search(rb"Content-Length: (\d+)", head)
            if not sep or not m or len(rest) < int(m.group(1)):
                return
            status = int(head.split()[1])
            self.statuses[status] = self.statuses.get(status, 0) + 1
            del buf[:len(head) + 4 + int(m.group(1))]
            try:
                sock.send(self.request)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()


GOOD = {"Authorization": _basic("prom", "s3cret")}
SCRAPER = "127.0.0.2"   # Prometheus, on another host than the attacker


def _scrape(exp):
    """GET /quick.stp with the correct password from SCRAPER's address: the
    flood fills 127.0.0.1's share of connections (--max-connections-per-client),
    which is answered 503 by design, not what is tested here."""
    r = exp.get("/quick.stp", headers=GOOD, timeout=5, source=SCRAPER)
    return r.status if r.status == 200 else (r.status, r.body[:120])


@contextlib.contextmanager
def _flooded(dirs, exporter_factory, tmp_path, args=(), env=None):
    """An exporter that has served quick.stp once with the correct password
    (GOOD), then under a flood of wrong ones; yields (exporter, flood)."""
    scripts, _ = dirs
    write_script(scripts, "quick.stp")      # output is a regular file, read in a thread
    cfg = _web_config(tmp_path, {"prom": ("s3cret", 10)})
    exp = exporter_factory(["--web-config", cfg] + list(args), env=env)
    assert exp.get_until("/quick.stp", headers=GOOD).status == 200
    flood = WrongPasswordFlood(exp)
    try:
        wait_for(lambda: sum(flood.statuses.values()) >= ATTACKERS, timeout=30,
                 message="the flood to get going")
        yield exp, flood
    finally:
        flood.close()
    assert "Traceback" not in exp.log_text()


def test_wrong_passwords_do_not_starve_scrapes(dirs, exporter_factory, tmp_path):
    with _flooded(dirs, exporter_factory, tmp_path) as (exp, flood):
        t_end = time.monotonic() + 3
        took = []
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            status = _scrape(exp)
            took.append(time.monotonic() - t0)
            assert status == 200, status
            time.sleep(0.1)
        # (The hub itself is saturated by the flood on a small machine: the
        # scrapes wait their turn, but never for bcrypt.)
        assert statistics.median(took) < 0.5 and max(took) < 2.5, took
        # Beyond the bcrypt queue, failed logins are answered 503 at once.
        assert flood.statuses.get(503, 0) > 0, flood.statuses
        assert flood.statuses.get(401, 0) > 0, flood.statuses
        exp.wait_log(r'event=auth client=127\.0\.0\.1:\d+ user=prom msg="refused: \d+'
                     r' authentication checks under way; answered 503')


LIBFAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), "libfaketime.so.1")


@pytest.mark.debian_tools
@pytest.mark.skipif(not os.path.exists(LIBFAKETIME), reason="libfaketime is not installed")
def test_a_verified_password_outlasts_hours_of_wrong_ones(dirs, exporter_factory, tmp_path):
    """The exporter's clocks are moved hours on, three times, in the middle
    of a flood (libfaketime reads the offset from a file every second): a
    password verified before the flood is still served at once, with every
    bcrypt slot taken by wrong ones."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    # The offset is read again each second, not on every clock call:
    # Debian 12's libfaketime (0.9.10) reads it into one buffer shared by all
    # threads, and with a read on every call, a thread's clock read now and
    # then came out wrong and fired a scrape's timers early (a 503).
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(offset),
           "FAKETIME_CACHE_DURATION": "1"}
    # A long keepalive: the clock's jump must not stop the script as idle.
    with _flooded(dirs, exporter_factory, tmp_path, ["--keepalive", "86400"], env) as (exp, flood):
        statuses = []
        # Each jump outlasts any cache expiry again: a cache that needs a new
        # check would have to win a bcrypt slot from the flood every time.
        for hours in (2, 4, 6):
            # Renamed into place: the daemon must never read it half written.
            (tmp_path / "faketime.new").write_text("+%dh\n" % hours)
            os.replace(tmp_path / "faketime.new", offset)

            def server_clock_moved():
                date = exp.get("/-/healthy", timeout=5).header("Date")  # 401: no password
                ahead = email.utils.parsedate_to_datetime(date).timestamp() - time.time()
                return ahead > (hours - 1) * 3600
            wait_for(server_clock_moved, timeout=10, message="the exporter's clock to move on")
            for _ in range(2):
                try:
                    statuses.append(_scrape(exp))
                except OSError as err:
                    statuses.append(repr(err))
                time.sleep(0.2)
        assert statuses == [200] * 6
        assert flood.statuses.get(401, 0) > 0, flood.statuses


def _failure_time(exp, user, password):
    conn = http.client.HTTPConnection(exp.host, exp.port, timeout=10)
    try:
        t0 = time.monotonic()
        conn.request("GET", "/-/healthy", headers={"Authorization": _basic(user, password)})
        resp = conn.getresponse()
        resp.read()
        took = time.monotonic() - t0
    finally:
        conn.close()
    assert resp.status == 401
    return took


def test_failure_time_does_not_tell_which_user_exists(dirs, exporter_factory, tmp_path):
    cfg = _web_config(tmp_path, {"cheap": ("pw1", 4), "dear": ("pw2", 11)})
    exp = exporter_factory(["--web-config", cfg])
    times = {"cheap": [], "dear": [], "nobody": []}
    for _ in range(9):  # medians of several: one check can be slowed by the machine
        for user in times:
            times[user].append(_failure_time(exp, user, "wrong"))
    medians = {user: statistics.median(t) for user, t in times.items()}
    slowest = max(medians.values())
    assert slowest > 0.02, medians      # cost 11 really was checked
    for user, median in medians.items():
        assert median > 0.7 * slowest, "%s: %r" % (user, medians)
    exp.wait_log(r'event=auth client=127\.0\.0\.1:\d+ user=cheap msg="denied: wrong user'
                 r' name or password')
