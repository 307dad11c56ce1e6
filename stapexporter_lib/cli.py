"""Command line: the docopt usage text (it mirrors the man page) and its
validation into a ``Config``.  Touches no sockets and starts no processes.

Owns the option list and its defaults (the usage text is their single
source), their validation and ``Config``.  Must not touch sockets, processes
or logging.
"""

import math
import os
import pwd
import shlex
from typing import List, NamedTuple, Optional

from docopt import DocoptExit, docopt

from . import __version__, addresses, trust

PROG = "stap-exporter"
DEFAULT_SCRIPTS_DIR = "/etc/stap-exporter"


def default_procfs_dirs() -> List[str]:
    """The directories systemtap's runtimes create module directories in."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return ["/proc/systemtap", "/var/tmp/systemtap-" + user]


def default_scripts_dir() -> str:
    """The default of --scripts: /etc/stap-exporter, where stappaths(7) puts
    stap-exporter's scripts, however the program was installed (Debian
    package, pip, a checkout).  Nothing installs a script there: the bundled
    examples go to PREFIX/share/doc/stap-exporter/examples/, so the exporter
    runs only scripts the administrator chose."""
    return DEFAULT_SCRIPTS_DIR


USAGE = """\
stap-exporter - serve SystemTap scripts' Prometheus metrics over HTTP.

Usage:
  stap-exporter [options]
  stap-exporter --check [options]
  stap-exporter -h | --help
  stap-exporter --version

Options:
  -p --port PORT            TCP port to listen on; 0 picks a free one
                            [default: 9900].
  -k --keepalive KEEPALIVE  Stop a script KEEPALIVE seconds after its last
                            request (default: never; once started, scripts
                            run until the exporter stops).
  -s --scripts SCRIPTS      Directory searched for *.stp scripts
                            [default: {scripts}].
  -c SCRIPTS                Same as --scripts.
  --listen ADDR             Address to listen on, e.g. 127.0.0.1 or ::1
                            (default: all interfaces, IPv6 and IPv4).
  --advertise-address HOST:PORT
                            Address /targets gives Prometheus for every script
                            (default: the Host the client used).
  --stap CMD                Command that runs a script file that is not
                            executable; split like a shell would [default: stap].
  --procfs-dirs DIRS        Colon-separated directories searched for
                            MODULE/__prometheus [default: {procfs}].
  --follow-symlinks         Also serve symbolic links that point outside the
                            scripts directory (by default they are ignored).
  --insecure-scripts        Run scripts even if the scripts directory or a
                            script file is not owned by root (or the
                            exporter's user) or is writable by group or
                            others.  Risky: whoever can write them runs code
                            as root.
  --max-scripts N           At most N scripts running at once; requests that
                            would start more get 503 [default: 256].
  --max-starting N          At most N starts that compile (or run stap or a
                            wrapper) at once, each until its output appears;
                            loading a kept module does not count; more are
                            queued and start in turn [default: 4].
  --max-series N            Answer 502 instead of serving a script's output
                            that holds more than N samples (default: no
                            limit).
  --bpf-stats               Turn the kernel's BPF run-time statistics on while
                            the exporter runs, for each BPF script's probe
                            time and run count.
  --max-connections N       At most N client connections at once; more get a
                            503 and are closed [default: 512].
  --max-connections-per-client N
                            At most N connections at once from one client
                            address (IPv6: one /64); more take the slot of
                            its own idle or slow ones, or get a 503
                            [default: 128].
  --scrape-timeout SECONDS  Longest a request waits for a running script's
                            output; shortened by a Prometheus scraper's
                            X-Prometheus-Scrape-Timeout-Seconds [default: 5].
  --header-timeout SECONDS  Time a client gets to send its request line and
                            headers (at most 10); also how long an idle
                            keep-alive connection is kept [default: 30].
  --send-timeout SECONDS    Drop a client that reads nothing of a response
                            for SECONDS [default: 10].
  --recompile               Compile a script afresh on every start instead of
                            rerunning the module compiled by its last run.
  --cache-dir DIR           Where compiled modules are kept across restarts;
                            used only if owned by root (or the exporter's
                            user) and not writable by group or others
                            [default: /var/cache/stap-exporter].
  --web-config FILE         TLS and basic-auth settings, in the Prometheus
                            exporter-toolkit web configuration format.
  --stop-timeout SECONDS    How long a stopping script gets after SIGTERM
                            before SIGKILL [default: 5].
  --log-level LEVEL         debug, info, warning or error [default: info].
  --log-format FORMAT       logfmt or json [default: logfmt].
  --validate                Check each script's output with the Prometheus
                            text parser; answer 502 instead of serving
                            invalid text.
  --check                   Check every script with systemtap (stap -p2),
                            print one line per script and exit.
  -h --help                 Show this help and exit.
  --version                 Show the version and exit.
"""

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")


class UsageError(Exception):
    """A bad command line; the message is one line for the user."""


class Config(NamedTuple):
    """Validated settings, built by ``parse()`` from the parsed options alone:
    the usage text is the single source of every default, so neither this
    class nor the components it configures have defaults of their own."""

    port: int
    keepalive: Optional[float]
    scripts_dir: str
    listen: Optional[str]
    advertise_address: Optional[str]
    stap: List[str]
    procfs_dirs: List[str]
    follow_symlinks: bool
    insecure_scripts: bool
    max_scripts: int
    max_starting: int
    max_series: Optional[int]
    bpf_stats: bool
    max_connections: int
    max_connections_per_client: int
    scrape_timeout: float
    header_timeout: float
    send_timeout: float
    recompile: bool
    cache_dir: str
    web_config: Optional[str]
    stop_timeout: float
    log_level: str
    log_format: str
    validate: bool
    check: bool


def usage_text() -> str:
    return USAGE.format(scripts=default_scripts_dir(),
                        procfs=":".join(default_procfs_dirs()))


def parse(argv: List[str]) -> Config:
    """ARGV (without the program name) -> Config.  Raises UsageError.
    ``--help`` and ``--version`` print and raise SystemExit(0), as docopt does."""
    try:
        args = docopt(usage_text(), argv=argv, version="%s %s" % (PROG, __version__))
    except DocoptExit:
        raise UsageError("invalid arguments %s (see '%s --help')"
                         % (" ".join(shlex.quote(a) for a in argv), PROG)) from None
    # Check the plain values first and the file system last.
    return Config(
        port=_port(args["--port"]),
        keepalive=_keepalive(args["--keepalive"]),
        stop_timeout=_seconds("--stop-timeout", args["--stop-timeout"]),
        header_timeout=_seconds("--header-timeout", args["--header-timeout"]),
        send_timeout=_seconds("--send-timeout", args["--send-timeout"]),
        scrape_timeout=_seconds("--scrape-timeout", args["--scrape-timeout"]),
        max_scripts=_count("--max-scripts", args["--max-scripts"]),
        max_starting=_count("--max-starting", args["--max-starting"]),
        max_series=_count("--max-series", args["--max-series"])
        if args["--max-series"] is not None else None,
        bpf_stats=bool(args["--bpf-stats"]),
        max_connections=_count("--max-connections", args["--max-connections"]),
        max_connections_per_client=_count("--max-connections-per-client",
                                          args["--max-connections-per-client"]),
        listen=_listen(args["--listen"]),
        advertise_address=_advertise(args["--advertise-address"]),
        stap=_stap(args["--stap"]),
        procfs_dirs=_procfs_dirs(args["--procfs-dirs"]),
        log_level=_log_level(args["--log-level"]),
        log_format=_choice("--log-format", args["--log-format"], LOG_FORMATS),
        check=bool(args["--check"]),
        validate=bool(args["--validate"]),
        follow_symlinks=bool(args["--follow-symlinks"]),
        insecure_scripts=bool(args["--insecure-scripts"]),
        recompile=bool(args["--recompile"]),
        cache_dir=_cache_dir(args["--cache-dir"]),
        web_config=os.path.abspath(args["--web-config"]) if args["--web-config"] else None,
        scripts_dir=_scripts_dir(args["-c"] or args["--scripts"]),
    )


def _port(value: str) -> int:
    try:
        port = int(value, 10)
    except ValueError:
        raise UsageError("--port: %r is not a number" % value) from None
    if not 0 <= port <= 65535:
        raise UsageError("--port: %d is out of range (0-65535)" % port)
    return port


def _keepalive(value: Optional[str]) -> Optional[float]:
    return None if value is None else _seconds("--keepalive", value)


def _seconds(option: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError("%s: %r is not a number of seconds" % (option, value)) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError("%s: %r must be a positive number of seconds" % (option, value))
    return seconds


def _scripts_dir(value: str) -> str:
    path = os.path.abspath(value)
    if not os.path.exists(path):
        raise UsageError("--scripts: directory %s does not exist" % path)
    if not os.path.isdir(path):
        raise UsageError("--scripts: %s is not a directory" % path)
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError("--scripts: directory %s is not readable" % path)
    return path


def scripts_dir_refusal(config: Config) -> Optional[str]:
    """The start-up error (one line) when the scripts directory is not
    trusted and --insecure-scripts was not given, else None.  Checked at
    start-up rather than parse time: it is a refusal (exit status 1), not a
    bad command line."""
    if config.insecure_scripts:
        return None
    refusal = trust.dir_refusal(config.scripts_dir)
    if refusal:
        return ("--scripts: refusing to run scripts from %s: %s (make it owned by root"
                " and not writable by group or others, or see --insecure-scripts)"
                % (config.scripts_dir, refusal))
    return None


def _count(option: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise UsageError("%s: %r is not a whole number" % (option, value)) from None
    if number < 1:
        raise UsageError("%s: %d must be at least 1" % (option, number))
    return number


def _listen(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    addr = value.strip()
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    if not addr:
        raise UsageError("--listen: empty address")
    return addr


def _advertise(value: Optional[str]) -> Optional[str]:
    """HOST:PORT (IPv6 in brackets), normalised; None when not given."""
    if value is None:
        return None
    parsed = addresses.parse_host_port(value.strip())
    if parsed is None:
        raise UsageError("--advertise-address: %r is not HOST:PORT (a host name or IP"
                         " address, IPv6 in brackets, and a port 1-65535)" % value)
    return addresses.format_address(*parsed)


def _stap(value: str) -> List[str]:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise UsageError("--stap: cannot parse %r: %s" % (value, exc)) from None
    if not words:
        raise UsageError("--stap: empty command")
    if os.sep in words[0]:
        # Scripts run in a private working directory: a relative path to the
        # command would not be found there.
        words[0] = os.path.abspath(words[0])
    return words


def _cache_dir(value: str) -> str:
    if not value:
        raise UsageError("--cache-dir: empty path")
    return os.path.abspath(value)


def _procfs_dirs(value: str) -> List[str]:
    dirs = [d for d in value.split(":") if d]
    if not dirs:
        raise UsageError("--procfs-dirs: no directory given")
    return [os.path.abspath(d) for d in dirs]


def _log_level(value: str) -> str:
    return _choice("--log-level", value, LOG_LEVELS)


def _choice(option: str, value: str, choices) -> str:
    lowered = value.lower()
    if lowered not in choices:
        raise UsageError("%s: %r is not one of %s" % (option, value, ", ".join(choices)))
    return lowered
