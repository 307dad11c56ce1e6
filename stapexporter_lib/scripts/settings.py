"""A script's own settings, from comment lines in the script file:

    # stap-exporter: keepalive=600 autostart=yes scrape-timeout=3

(a ``#`` comment is valid in SystemTap scripts and in shell wrappers).  A
setting overrides the command line's for that script only.  An unknown key,
a key given twice or a bad value refuses the script: ``SettingsError``, one
line that names the key.

Pure text: must not touch files, processes or sessions.
"""

import math
import re
from typing import Dict, NamedTuple, Optional

from ..logs import escape_line

# The keys, in the order the index page shows them.
KEYS = ("keepalive", "autostart", "scrape-timeout", "max-series")

NEVER = "never"

_LINE_RE = re.compile(r"^[ \t]*#[ \t]*stap-exporter:(.*)$", re.M)
# A value is quoted in a refusal at most this long.
MAX_SHOWN = 40


class SettingsError(ValueError):
    """A setting is unknown, repeated or has a bad value (one line, naming
    the key)."""


class Settings(NamedTuple):
    """What the script sets; None where it sets nothing (the command line's
    applies).  ``keepalive`` is ``math.inf`` for ``never``."""

    keepalive: Optional[float] = None
    autostart: Optional[bool] = None
    scrape_timeout: Optional[float] = None
    max_series: Optional[int] = None


def parse(source: bytes) -> Settings:
    """The settings of the script whose bytes are SOURCE.  Raises
    SettingsError."""
    given: Dict[str, str] = {}
    for line in _LINE_RE.findall(source.decode("utf-8", "replace")):
        for word in line.split():
            key, eq, value = word.partition("=")
            if key not in KEYS:
                raise SettingsError("unknown setting %s (known: %s)"
                                    % (_shown(key), ", ".join(KEYS)))
            if not eq or not value:
                raise SettingsError("setting %s has no value (write %s=VALUE)" % (key, key))
            if key in given:
                raise SettingsError("setting %s is given twice" % key)
            given[key] = value
    return Settings(
        keepalive=_take(given, "keepalive", _keepalive),
        autostart=_take(given, "autostart", _yes_no),
        scrape_timeout=_take(given, "scrape-timeout", _seconds),
        max_series=_take(given, "max-series", _count))


def describe(keepalive: Optional[float], autostart: bool, scrape_timeout: float,
             max_series: Optional[int]) -> str:
    """Settings in effect, as a script would write them (None: never, or no
    limit)."""
    words = ["keepalive=%s" % (NEVER if keepalive is None else "%g" % keepalive),
             "autostart=%s" % ("yes" if autostart else "no"),
             "scrape-timeout=%g" % scrape_timeout]
    if max_series is not None:
        words.append("max-series=%d" % max_series)
    return " ".join(words)


def _take(given: Dict[str, str], key: str, convert):
    value = given.get(key)
    if value is None:
        return None
    try:
        return convert(value)
    except ValueError as exc:
        raise SettingsError("setting %s=%s: expected %s" % (key, _shown(value), exc)) from None


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a positive number of seconds")
    return seconds


def _keepalive(value: str) -> float:
    if value == NEVER:
        return math.inf
    try:
        return _seconds(value)
    except ValueError:
        raise ValueError("a positive number of seconds or %s" % NEVER) from None


def _yes_no(value: str) -> bool:
    if value not in ("yes", "no"):
        raise ValueError("yes or no")
    return value == "yes"


def _count(value: str) -> int:
    if not value.isdigit() or not value.isascii() or int(value) < 1:
        raise ValueError("a whole number of at least 1")
    return int(value)


def _shown(text: str) -> str:
    text = escape_line(text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."
