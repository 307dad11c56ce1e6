"""WSGIServer wiring, signals and the run loop; ``main()`` lives here.

Signal handlers only record what to do; the work (rescans, shutdown) runs in
greenlets, never inside the handler.

Owns the wiring of the components (the one place they meet, each given the
part of ``cli.Config`` it needs), the listener, signals and the exit status.
Must not hold request or lifecycle logic.
"""

import errno
import logging
import os
import signal
import socket
import sys
import tempfile
from typing import List, Optional

import gevent
import gevent.event
from gevent import socket as gsocket

from . import __version__, cli
from .logs import AccessLog, setup_logging
from .offhub import in_pool
from .scripts import bpfstats, output
from .scripts.build import ModuleCache, Plan
from .scripts.catalog import Catalog
from .scripts.manager import Manager
from .scripts.leftovers import sweep_leftovers
from .scripts.process import set_child_subreaper
from .scripts.session import START_WAIT, SessionConfig
from .web import discovery
from .web.app import App
from .web.http import Server
from .web.selfmetrics import SelfMetrics

log = logging.getLogger("stap-exporter")

BACKLOG = 1024
# The first descriptor systemd passes a socket-activated service (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3
# How long in-flight requests get to finish once the scripts have stopped.
REQUEST_DRAIN = 2.0


class StartupError(Exception):
    """The server could not start; the message is one line for the user."""


def show_address(host: str, port: int) -> str:
    """HOST:PORT, with IPv6 addresses in brackets."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def make_listener(addr: Optional[str], port: int) -> gsocket.socket:
    """Bind and listen.  ADDR None means every interface: IPv6 dual-stack
    when the host has IPv6, IPv4 otherwise.  Raises StartupError."""
    candidates = [("::", True), ("0.0.0.0", False)] if addr is None else [(addr, False)]
    last = None
    for host, dual in candidates:
        # A str host goes through the idna codec, whose import (with
        # stringprep's tables) would stay resident: ASCII is passed as bytes.
        name = host.encode("ascii") if host.isascii() else host
        try:
            infos = socket.getaddrinfo(name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE | socket.AI_NUMERICSERV)
        except socket.gaierror as exc:
            last = "cannot listen on %s: %s" % (host, exc.strerror)
            continue
        except UnicodeError:  # an empty or over-long label of a non-ASCII name
            last = "cannot listen on %s: not a valid host name" % host
            continue
        family, _, _, _, sockaddr = infos[0]
        sock = gsocket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and dual:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            return sock
        except OSError as exc:
            sock.close()
            last = "cannot listen on %s: %s" % (show_address(host, port), exc.strerror)
            if addr is None and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            break
    raise StartupError(last)


def inherited_listener() -> Optional[gsocket.socket]:
    """The listening socket systemd passed this process (socket activation:
    LISTEN_PID is our pid, LISTEN_FDS at least 1), or None.  The variables
    are removed so that no child takes them for its own.  Raises
    StartupError when descriptor 3 is not a listening TCP socket."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count or not count.isdigit() or int(count) < 1:
        return None
    fd = SD_LISTEN_FDS_START
    refusal = "socket activation: descriptor %d (LISTEN_FDS) is not a listening TCP socket" % fd
    try:
        sock = gsocket.socket(fileno=fd)
    except OSError as exc:
        raise StartupError("%s: %s" % (refusal, exc.strerror)) from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    except OSError:
        listening = kind = None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM \
            or not listening:
        sock.detach()
        raise StartupError(refusal)
    os.set_inheritable(fd, False)
    if int(count) > 1:
        log.warning("socket-activation: serving descriptor %d only; %d more passed are not"
                    " used", fd, int(count) - 1)
    return sock


class _LocalAddressHandler(Server.handler_class):
    """Tells the app the connection's local address (``/targets`` advertises
    it when a request has no usable Host header); looked up only if used."""

    def get_environ(self):
        env = super().get_environ()
        env[discovery.SOCKNAME_KEY] = self.socket.getsockname
        return env


class Exporter:
    """The running daemon: listener, manager, server and signal handling."""

    def __init__(self, config: cli.Config):
        self.config = config
        refusal = cli.scripts_dir_refusal(config)
        if refusal:
            raise StartupError(refusal)
        self.catalog = Catalog(config.scripts_dir, follow_symlinks=config.follow_symlinks)
        self.module_cache = ModuleCache(None if config.recompile else config.cache_dir,
                                        config.stap)
        self.manager = Manager(self.catalog, SessionConfig(
            stap=config.stap, procfs_dirs=config.procfs_dirs, keepalive=config.keepalive,
            start_wait=START_WAIT, stop_grace=config.stop_timeout,
            workdir_root=tempfile.gettempdir(), max_output=output.DEFAULT_MAX_BYTES,
            plan=Plan(config.stap), cache=self.module_cache, insecure_scripts=config.insecure_scripts,
            max_series=config.max_series),
            max_running=config.max_scripts, max_starting=config.max_starting)
        self.metrics = SelfMetrics(self.manager, bpf_stats=config.bpf_stats)
        self.web = None
        self._tls_args: dict = {}
        auth = None
        if config.web_config:
            # TLS, YAML and bcrypt are loaded only for a --web-config: an
            # exporter without one does not carry them (a few MiB resident).
            from .web import basicauth, webconfig
            try:
                self.web = webconfig.load(config.web_config)
            except webconfig.WebConfigError as exc:
                raise StartupError(str(exc)) from None
            if self.web.auth_required:
                auth = basicauth.BasicAuth(self.web.users)
            self._tls_args = webconfig.wrap_socket_args(self.web)
        self.app = App(self.manager, default_timeout=config.scrape_timeout,
                       metrics=self.metrics, validate=config.validate, auth=auth,
                       advertise=config.advertise_address, bpf_stats=config.bpf_stats)
        self.server: Optional[Server] = None
        self._stopping = gevent.event.Event()

    def serve(self) -> int:
        # Handlers first: a signal that arrives once the start-up banner is
        # out (a supervisor's reload, say) must find them in place.
        gevent.signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        gevent.signal_handler(signal.SIGHUP, self._on_hup)
        listener = inherited_listener()
        if listener is None:
            listener = make_listener(self.config.listen, self.config.port)
        else:
            log.info("socket-activation: serving the listening socket systemd passed;"
                     " --port and --listen are not used")
        stats_off = self._bpf_stats_on() if self.config.bpf_stats else None
        try:
            return self._serve(listener)
        finally:
            if stats_off is not None:
                stats_off()

    @staticmethod
    def _bpf_stats_on():
        """--bpf-stats: the kernel's BPF statistics on; the function that
        turns them off again.  Raises StartupError."""
        try:
            how, stats_off = bpfstats.enable_stats()
        except bpfstats.StatsError as exc:
            raise StartupError(str(exc)) from None
        log.info("bpf-stats: the kernel's BPF run-time statistics are on: %s", how)
        return stats_off

    def _serve(self, listener) -> int:
        set_child_subreaper()
        sweep_leftovers(self.config.procfs_dirs, spare=[self.config.cache_dir])
        self.module_cache.setup()
        self.server = Server(listener, self.app, log=AccessLog(), error_log=AccessLog(),
                             spawn="default", header_timeout=self.config.header_timeout,
                             max_connections=self.config.max_connections,
                             max_per_client=self.config.max_connections_per_client,
                             handler_class=_LocalAddressHandler,
                             # pywsgi would otherwise look the address up in
                             # DNS (getfqdn) at start-up, in a thread, however
                             # slow the resolver.
                             environ={"SERVER_NAME": str(listener.getsockname()[0])},
                             send_timeout=self.config.send_timeout,
                             **self._tls_args)
        self.server.start()
        self.manager.start()
        log.info("started: stap-exporter %s listening on %s, scripts in %s: %s",
                 __version__, show_address(*listener.getsockname()[:2]), self.catalog.directory,
                 ", ".join(self.catalog.names()) or "none")
        if self.web is not None:
            self._log_web_config("")
        self._stopping.wait()
        return self._shutdown()

    def _log_web_config(self, how: str) -> None:
        log.info("web-config: %s: %sTLS %s, basic auth %s", self.config.web_config, how,
                 "on" if self.web.ssl_context else "off",
                 "on (%d users)" % len(self.web.users) if self.web.auth_required else "off")
        for note in self.web.notes:
            log.info("web-config: %s", note)

    def _reload_web_config(self) -> None:
        """Read --web-config again (SIGHUP): new certificates and users serve
        new connections and requests; a file that is not valid changes
        nothing."""
        from .web import basicauth, webconfig
        try:
            web = in_pool(webconfig.load, self.config.web_config)
        except webconfig.WebConfigError as exc:
            log.error("web-config: %s; not reloaded, the running configuration stays", exc)
            return
        if (web.ssl_context is None) != (self.web.ssl_context is None):
            log.error("web-config: %s: turning TLS %s needs a restart; not reloaded, the"
                      " running configuration stays", self.config.web_config,
                      "on" if web.ssl_context else "off")
            return
        self._tls_args = webconfig.wrap_socket_args(web)
        if web.ssl_context is not None and self.server is not None:
            self.server.use_ssl_context(web.ssl_context)
        self.app.auth = basicauth.BasicAuth(web.users) if web.auth_required else None
        self.web = web
        self._log_web_config("reloaded: ")

    def _on_stop_signal(self, name: str) -> None:
        log.info("signal: %s received, shutting down", name)
        self._stopping.set()

    def _on_hup(self) -> None:
        log.info("signal: SIGHUP received, rescanning %s%s", self.catalog.directory,
                 " and reading %s again" % self.config.web_config if self.web else "")
        gevent.spawn(self.manager.rescan)
        if self.web is not None:
            gevent.spawn(self._reload_web_config)

    def _shutdown(self) -> int:
        # Stop accepting and close idle connections first, then stop the
        # scripts while in-flight requests finish (their responses say
        # Connection: close), then wait for those.
        self.server.close()
        self.server.begin_shutdown()
        ok = self.manager.shutdown()
        self.server.wait_handlers(REQUEST_DRAIN)
        self.server.stop(timeout=REQUEST_DRAIN)
        self.module_cache.clear()
        log.info("exited: stap-exporter stopped%s", "" if ok else " (some scripts did not stop)")
        return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    """The stap-exporter command.  Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = cli.parse(argv)
    except cli.UsageError as exc:
        print("%s: error: %s" % (cli.PROG, exc), file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    if config.check:
        from .check import run_check
        return run_check(config)
    try:
        exporter = Exporter(config)
        return exporter.serve()
    except StartupError as exc:
        print("%s: error: %s" % (cli.PROG, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
