"""The set of sessions: lookups, autostarts, rescans and shutdown.

The manager owns the sessions by name, the caps on starts (--max-scripts
here, --max-starting through the sessions' shared ``StartSlots``),
autostarts, rescans, the look at the script files once a second (a running
script's edit, another's settings) and the order of shutdown.
"""

import logging
import os
import time
from typing import Callable, Dict, List, Optional

import gevent

from .. import trust
from ..offhub import in_pool
from .catalog import Catalog, Script
from .session import Session, SessionConfig, StartSlots, file_identity

log = logging.getLogger("stap-exporter")

# How much longer than the sessions' own stop budget a shutdown waits for the
# stopping greenlets to finish.
SHUTDOWN_MARGIN = 1.0
# How often the script files are looked at (an edit is noticed within this).
WATCH_INTERVAL = 1.0


class Manager:
    """Owns one Session per known script and decides when they come and go."""

    def __init__(self, catalog: Catalog, config: SessionConfig, max_running: int,
                 max_starting: int, clock: Callable[[], float] = time.monotonic,
                 session_factory=Session):
        self.catalog = catalog
        self.config = config
        self.sessions: Dict[str, Session] = {}
        self.shutting_down = False
        self.max_running = max_running  # --max-scripts: live scripts a request may start
        self.start_slots = StartSlots(max_starting)
        self.clock = clock
        self._factory = session_factory
        self._watcher: Optional[gevent.Greenlet] = None

    def start(self) -> None:
        """Scan the directory, read every script's settings, start every
        autostart script, and look at the files once a second from now on."""
        self.warn_untrusted_procfs_dirs()
        if self.config.insecure_scripts:
            log.warning("insecure: --insecure-scripts: scripts in %s run as this user even if"
                        " others can write them", self.catalog.directory)
        self.catalog.rescan()
        self.look_at_files()
        self._start_autostarts()
        self._watcher = gevent.spawn(self._watch_files)

    def warn_untrusted_procfs_dirs(self) -> None:
        """Say at start-up which --procfs-dirs entries are not trusted: every
        output found in them will be refused (an unprivileged user may have
        created /var/tmp/systemtap-root before systemtap did)."""
        for directory in self.config.procfs_dirs:
            refusal = trust.dir_refusal(directory)
            if refusal:
                log.warning("untrusted: procfs_dir=%s %s; script output found there will be"
                            " refused: remove the directory (systemtap recreates it) or make"
                            " it owned by root and not writable by group or others",
                            directory, refusal)

    def get(self, name: str) -> Optional[Session]:
        """The session serving NAME, or None if there is no such script.

        A script whose file was removed keeps serving while it runs and is
        forgotten once it has stopped."""
        session = self.sessions.get(name)
        if session is not None and session.live:
            return session  # running, even if its file is gone: keep serving
        # Not running: it will start, so its file must (still) be servable.
        script = self.catalog.lookup(name)
        if script is not None and not self.catalog.still_valid(script):
            self.catalog.rescan()
            script = self.catalog.get(name)
        if script is None:
            self.sessions.pop(name, None)
            return None
        if session is None or session.script is not script:
            session = self.sessions[name] = self._new_session(script)
        return session

    def _new_session(self, script: Script) -> Session:
        return self._factory(script, self.config, clock=self.clock, admit=self._admit,
                             start_slots=self.start_slots)

    def _admit(self, session: Session) -> Optional[str]:
        """None if a request may start SESSION now, else the reason why not.
        (Autostart scripts are started by the exporter regardless.)"""
        if self.shutting_down:
            return "the exporter is shutting down"
        running = sum(1 for s in self.sessions.values() if s.live)
        if running >= self.max_running:
            return ("%d scripts are running, the most allowed (--max-scripts); try again"
                    " when one stops" % running)
        return None

    def all(self) -> List[Session]:
        """A session for every known script (created lazily), sorted by name,
        plus removed scripts that are still running."""
        for name in self.catalog.names():
            if name not in self.sessions:
                self.get(name)
        sessions = [self.sessions[n] for n in sorted(self.sessions)]
        for session in sessions:
            if not session.live:
                session.script_refusal()  # marks an untrusted file on the index page
        return sessions

    def rescan(self) -> None:
        """Re-read the directory (SIGHUP): start new autostart scripts, stop
        autostart scripts whose file is gone."""
        added, removed = self.catalog.rescan()
        if added or removed:
            log.info("rescan: %d scripts (added: %s; removed: %s)", len(self.catalog),
                     ", ".join(added) or "none", ", ".join(removed) or "none")
        for name in removed:
            session = self.sessions.get(name)
            if session is None or not session.live:
                self.sessions.pop(name, None)
            elif session.autostart:
                gevent.spawn(self._stop_and_forget, name, session)
        self.look_at_files()
        self._start_autostarts()

    def _watch_files(self) -> None:
        while True:
            gevent.sleep(WATCH_INTERVAL)
            try:
                self.look_at_files()
            except Exception:  # noqa: BLE001 -- loop boundary: log and look again
                log.exception("watch: looking at the script files failed")

    def look_at_files(self) -> None:
        """Look at every script file (metadata, in the thread pool): a
        running script whose file changed tries its new version; another
        one's settings are read again, and it starts if it now autostarts."""
        for script in self.catalog.scripts():
            if script.name not in self.sessions:
                self.sessions[script.name] = self._new_session(script)
        sessions = list(self.sessions.values())
        if not sessions:
            return
        identities = in_pool(_identities, [s.script.path for s in sessions])
        for session, identity in zip(sessions, identities):
            if session.file_changed(identity) and not session.live:
                session.read_settings(identity)
                if session.autostart and not self.shutting_down:
                    log.info("autostart: script=%s", session.name)
                    session.start()

    def _stop_and_forget(self, name: str, session: Session) -> None:
        session.stop()
        if self.sessions.get(name) is session and self.catalog.get(name) is None:
            del self.sessions[name]

    def _start_autostarts(self) -> None:
        if self.shutting_down:
            return
        for script in self.catalog.scripts():
            session = self.get(script.name)
            if session is not None and session.autostart and not session.live:
                log.info("autostart: script=%s", script.name)
                session.start()

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Stop every script at once and wait; True if all stopped in time."""
        self.shutting_down = True
        if self._watcher is not None:
            self._watcher.kill()
        live = [s for s in self.sessions.values() if s.live]
        if not live:
            return True
        log.info("shutdown: stopping %d scripts", len(live))
        budget = timeout if timeout is not None else max(s.stop_budget() for s in live)
        workers = [gevent.spawn(s.stop, budget) for s in live]
        gevent.joinall(workers, timeout=budget + SHUTDOWN_MARGIN)
        left = [s.name for s in live if s.live]
        if left:
            log.error("shutdown: scripts still running after %g s: %s", budget, ", ".join(left))
        return not left


def _identities(paths: List[str]) -> List[Optional[tuple]]:
    """``file_identity`` of each file (its final target), None where it
    cannot be had."""
    found = []
    for path in paths:
        try:
            found.append(file_identity(os.stat(path)))
        except OSError:
            found.append(None)
    return found
