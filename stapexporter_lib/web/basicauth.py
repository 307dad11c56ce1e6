"""HTTP basic authentication against bcrypt hashes, for ``--web-config``.

Owns the ``Authorization`` check.  Must not read the configuration file
(``webconfig.load`` gives it the users) or touch sessions or sockets.
"""

import base64
import binascii
import hashlib
import hmac
import logging
import os
import time
from typing import Dict, Optional, Tuple

import gevent
import gevent.lock

from .. import logs

log = logging.getLogger("stap-exporter")

CHALLENGE = ("WWW-Authenticate", 'Basic realm="stap-exporter", charset="UTF-8"')

# bcrypt checks running at once (in the hub's thread pool, whose other
# threads keep reading script output; one, so that a flood of wrong
# passwords costs the host one core at most), and how many may run or wait
# before requests get 503.
AUTH_THREADS = 1
AUTH_QUEUE = 16
# verify()'s answers.
AUTH_OK, AUTH_DENIED, AUTH_BUSY = "ok", "denied", "busy"
# How fast the measured duration of a highest-cost check follows changes.
FAILURE_TIME_WEIGHT = 0.2
MAX_LOGGED_USER = 100

# bcrypt only ever looks at the first 72 bytes of a password (Go's bcrypt, the
# toolkit's, ignores the rest; Python's bcrypt >= 5 raises instead).
BCRYPT_MAX_PASSWORD = 72


class BasicAuth:
    """HTTP basic authentication against bcrypt hashes.

    A password that was verified is remembered (an HMAC under a per-process
    key) for as long as this object serves, as its users cannot change
    meanwhile (a SIGHUP that reads the users again makes a new one): a
    scraper costs one bcrypt check per configuration, and wrong passwords,
    however many, never make it wait.  Failures are not remembered; at most
    AUTH_THREADS checks run at once and AUTH_QUEUE run or wait, beyond that
    ``verify`` answers BUSY at once.  A failure takes as long as a check at
    the highest configured cost whichever user was named (an unknown one is
    checked against a dummy hash of that cost): timing tells no user names.
    """

    def __init__(self, users: Dict[str, bytes]):
        self.users = {name.encode("utf-8"): hashed for name, hashed in users.items()}
        self._slots = gevent.lock.BoundedSemaphore(AUTH_THREADS)
        self._pending = 0
        self._verified = set()
        self._key = os.urandom(32)
        self._max_cost = max((_cost(h) for h in self.users.values()), default=4)
        self._dummy = b"$2b$%02d$" % self._max_cost + b"." * 53
        self._failure_time = None   # seconds a check at the highest cost takes
        self._busy_log = logs.Throttle()
        self._denied_log = logs.Throttle()

    @staticmethod
    def credentials(environ) -> Optional[Tuple[bytes, bytes]]:
        """(user, password) bytes from the request's Authorization header,
        or None when it is missing or malformed."""
        header = environ.get("HTTP_AUTHORIZATION")
        if not isinstance(header, str):
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip().encode("ascii"), validate=True)
        except (ValueError, binascii.Error, UnicodeEncodeError):
            return None
        user, colon, password = decoded.partition(b":")
        if not colon:
            return None
        try:
            user.decode("utf-8")
            password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return user, password

    def verify(self, environ) -> str:
        """AUTH_OK, AUTH_DENIED, or AUTH_BUSY when too many checks are
        already under way.  Blocks only the calling greenlet."""
        creds = self.credentials(environ)
        if creds is None:
            return AUTH_DENIED
        user, password = creds
        password = password[:BCRYPT_MAX_PASSWORD]
        key = hmac.new(self._key, user + b":" + password, hashlib.sha256).digest()
        if key in self._verified:
            return AUTH_OK
        client = "%s:%s" % (environ.get("REMOTE_ADDR", "-"), environ.get("REMOTE_PORT", "-"))
        logged_user = user.decode("utf-8", "replace")[:MAX_LOGGED_USER]
        if self._pending >= AUTH_QUEUE:
            self._busy_log.event(log, logging.WARNING, "auth", "refused: %d authentication"
                                 " checks under way; answered 503", self._pending,
                                 client=client, user=logged_user)
            return AUTH_BUSY
        hashed = self.users.get(user)
        ok, took = self._check(password, hashed or self._dummy)
        if ok and hashed is not None:
            self._verified.add(key)
            return AUTH_OK
        if self._failure_time is None:
            self._check(b"", self._dummy)       # measures the highest cost
        if self._failure_time > took:
            gevent.sleep(self._failure_time - took)
        self._denied_log.event(log, logging.WARNING, "auth", "denied: wrong user name or"
                               " password", client=client, user=logged_user)
        return AUTH_DENIED

    def _check(self, password: bytes, hashed: bytes) -> Tuple[bool, float]:
        """(bcrypt's answer, seconds it took), off the hub; learns how long
        a check at the highest cost takes."""
        self._pending += 1
        try:
            with self._slots:
                ok, took = gevent.get_hub().threadpool.apply(_timed_checkpw, (password, hashed))
        finally:
            self._pending -= 1
        if _cost(hashed) == self._max_cost:
            old = self._failure_time
            self._failure_time = took if old is None else old + FAILURE_TIME_WEIGHT * (took - old)
        return ok, took


def _cost(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


def _timed_checkpw(password: bytes, hashed: bytes) -> Tuple[bool, float]:
    """(checkpw's answer, seconds it took), measured in the worker thread."""
    started = time.perf_counter()
    try:
        import bcrypt  # only an exporter with users loads it
        ok = bcrypt.checkpw(password, hashed)
    except ValueError:
        ok = False
    return ok, time.perf_counter() - started
