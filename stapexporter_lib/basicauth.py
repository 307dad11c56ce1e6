"""HTTP basic authentication against bcrypt hashes, for ``--web-config``.

bcrypt is slow by design: checks run in a small thread pool of their own
(the hub's pool reads script output), with a bounded number under way;
successes are cached briefly under a per-process HMAC key; failures take
the same time whichever user was named.

Owns the ``Authorization`` check.  Must not read the configuration file
(``webconfig.load`` gives it the users) or touch sessions or sockets.
"""

import base64
import binascii
import collections
import hashlib
import hmac
import logging
import os
import time
from typing import Dict, Optional, Tuple

import bcrypt
import gevent
import gevent.threadpool

from . import logs

log = logging.getLogger("stap-exporter")

CHALLENGE = ("WWW-Authenticate", 'Basic realm="stap-exporter", charset="UTF-8"')

# Successful checks remembered by BasicAuth: how many, and for how long.
AUTH_CACHE_SIZE = 1024
AUTH_CACHE_TTL = 60.0
# bcrypt threads (separate from the hub's pool, which reads output), and how
# many checks may run or wait at once before requests get 503.
AUTH_THREADS = 2
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

    bcrypt is slow by design, so it runs in a small thread pool of its own
    (AUTH_THREADS), never on the hub and never in the pool that reads
    scripts' output, so failed logins cannot starve scrapes.  At most
    AUTH_QUEUE checks run or wait at once; beyond that ``verify`` answers
    BUSY at once (the app sends 503).  Successful checks are remembered for
    AUTH_CACHE_TTL seconds (bounded LRU keyed by an HMAC of user and
    password under a per-process key), so a scraper's repeated requests
    cost one bcrypt; failures are never remembered.

    A failure takes as long as a check at the highest configured cost,
    whichever user was named (known at a lower cost, known, or unknown):
    the name cannot be probed by timing.
    """

    def __init__(self, users: Dict[str, bytes], cache_size: int = AUTH_CACHE_SIZE,
                 threads: int = AUTH_THREADS, queue: int = AUTH_QUEUE,
                 cache_ttl: float = AUTH_CACHE_TTL, clock=time.monotonic):
        self.users = [(name.encode("utf-8"), hashed) for name, hashed in users.items()]
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.queue = queue
        self.clock = clock
        self._threads = threads
        self._pool = None
        self._pending = 0
        self._cache = collections.OrderedDict()  # type: collections.OrderedDict
        self._key = os.urandom(32)
        self._max_cost = max((_cost(h) for _, h in self.users), default=4)
        # Unknown users are checked against a hash of the highest cost.
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

    def check(self, environ) -> bool:
        """True if the request carries the right user name and password."""
        return self.verify(environ) == AUTH_OK

    def verify(self, environ) -> str:
        """AUTH_OK, AUTH_DENIED, or AUTH_BUSY when too many checks are
        already under way.  Blocks only the calling greenlet."""
        creds = self.credentials(environ)
        if creds is None:
            return AUTH_DENIED
        user, password = creds
        hashed = None
        for name, candidate in self.users:
            if hmac.compare_digest(name, user):
                hashed = candidate
        key = hmac.new(self._key, user + b":" + password, hashlib.sha256).digest()
        if hashed is not None and self._cached(key):
            return AUTH_OK
        if self._pending >= self.queue:
            self._log_refusal(self._busy_log, "refused: %d authentication checks under way;"
                              " answered 503", environ, user, self._pending)
            return AUTH_BUSY
        target = hashed or self._dummy
        ok, took = self._run(password[:BCRYPT_MAX_PASSWORD], target)
        if _cost(target) == self._max_cost:
            self._learn(took)
        if ok and hashed is not None:
            self._remember(key)
            return AUTH_OK
        self._pad_failure(took)
        self._log_refusal(self._denied_log, "denied: wrong user name or password",
                          environ, user)
        return AUTH_DENIED

    def _run(self, password: bytes, hashed: bytes) -> Tuple[bool, float]:
        if self._pool is None:
            self._pool = gevent.threadpool.ThreadPool(self._threads)
        self._pending += 1
        try:
            return self._pool.apply(_timed_checkpw, (password, hashed))
        finally:
            self._pending -= 1

    def _learn(self, took: float) -> None:
        old = self._failure_time
        self._failure_time = took if old is None else old + FAILURE_TIME_WEIGHT * (took - old)

    def _pad_failure(self, took: float) -> None:
        """Make this failure last as long as a check at the highest cost."""
        if self._failure_time is None:
            # Nothing measured at the highest cost yet: measure it now.
            _, measured = self._run(b"", self._dummy)
            self._learn(measured)
        remaining = self._failure_time - took
        if remaining > 0:
            gevent.sleep(remaining)

    def _cached(self, key: bytes) -> bool:
        expires = self._cache.get(key)
        if expires is None:
            return False
        if expires <= self.clock():
            del self._cache[key]
            return False
        self._cache.move_to_end(key)
        return True

    def _remember(self, key: bytes) -> None:
        self._cache[key] = self.clock() + self.cache_ttl
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @staticmethod
    def _log_refusal(throttle, text: str, environ, user: bytes, *args) -> None:
        skipped = throttle.allow()
        if skipped is not None:
            logs.event(log, logging.WARNING, "auth", text + "%s", *args,
                       " (and %d more not logged)" % skipped if skipped else "",
                       client="%s:%s" % (environ.get("REMOTE_ADDR", "-"),
                                         environ.get("REMOTE_PORT", "-")),
                       user=user.decode("utf-8", "replace")[:MAX_LOGGED_USER])


def _cost(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


def _timed_checkpw(password: bytes, hashed: bytes) -> Tuple[bool, float]:
    """(checkpw's answer, seconds it took), measured in the worker thread."""
    started = time.perf_counter()
    ok = _checkpw(password, hashed)
    return ok, time.perf_counter() - started


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False
