"""The exporter's own metrics, served at ``/metrics`` through prometheus_client.

A registry of our own (not the library's global default).  Per-script state
(up, the state as a one-hot gauge over every state, whether the output has
been read, starts, exits, restarts, output size, series) and cost (CPU time and
memory of the script's process group, read from ``/proc`` by ``proccost``; its
BPF programs' run time and memory or its kernel module's size) are read
when ``/metrics`` is scraped, so keeping them costs the hot path nothing;
only the scrape duration histogram, the error counter and the start-up
histogram are updated per request.

Owns the ``/metrics`` registry.  Must not change sessions (it only reads
them) or do work per request beyond those instruments.
"""

from typing import Dict, Optional, Tuple

from prometheus_client import (CollectorRegistry, Counter, Histogram, Info,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import __version__
from ..scripts import proccost
from ..states import ALL_STATES, RUNNING

# Scrapes are fast (sub-millisecond) unless a script is slow to produce output.
DURATION_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
# Start-up takes ~0.1 s for a kept module and from one second to a minute or
# more for a kernel-module compile.
START_BUCKETS = (.05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


def start_seconds(session) -> Optional[float]:
    """Spawn to first output of SESSION's last start that produced output;
    None until one has.  (``first_output_at`` is set when the session turns
    running: its output appeared, read or not; a start still compiling keeps
    the previous figure hidden.)"""
    first = getattr(session, "first_output_at", None)
    started = session.started_at
    if first is None or started is None or first < started:
        return None
    return first - started



# Per-script families, collected from the sessions at each /metrics scrape:
# (type, name, help, labels after "script").
LIFECYCLE_FAMILIES = (
    (GaugeMetricFamily, "stap_exporter_script_up",
     "1 when the script is running: its process runs and its output exists (read or not).",
     ()),
    (GaugeMetricFamily, "stap_exporter_script_state",
     "1 for the script's current state, 0 for the others (%s); the reason of backoff and"
     " refused is on the index page." % ", ".join(ALL_STATES), ("state",)),
    (GaugeMetricFamily, "stap_exporter_script_output_read",
     "1 once the output of the script's current run has been read by a request.", ()),
    (CounterMetricFamily, "stap_exporter_script_starts",
     "Times the script's process was started.", ()),
    (CounterMetricFamily, "stap_exporter_script_restarts",
     "Automatic restarts of an autostart script after it exited.", ()),
    (CounterMetricFamily, "stap_exporter_script_exits",
     "Ends of the script's process, by outcome: stopped (by the exporter), error (exited"
     " non-zero or killed), exited (status 0 on its own), spawn_error.", ("outcome",)),
    (GaugeMetricFamily, "stap_exporter_script_output_bytes",
     "Size of the script's last output read, in bytes.", ()),
    (GaugeMetricFamily, "stap_exporter_script_queued",
     "1 while the script's start waits its turn under --max-starting.", ()),
    (CounterMetricFamily, "stap_exporter_script_reload_failures",
     "Edits of the running script's file whose new version did not take over (refused, a"
     " wrong setting, or it failed to compile or start); the running version went on.", ()),
    (GaugeMetricFamily, "stap_exporter_script_series",
     "Samples in the script's last output read (served, or refused over the series limit).",
     ()),
    (GaugeMetricFamily, "stap_exporter_script_series_limit",
     "The most samples an output of the script may hold to be served (absent: no limit).", ()),
)
COST_FAMILIES = (
    (CounterMetricFamily, "stap_exporter_script_cpu_seconds",
     "User and system CPU time of the script's running process group (stap, its loader, a"
     " wrapper's children, and what they reaped); starts again from 0 with each run.", ()),
    (GaugeMetricFamily, "stap_exporter_script_resident_memory_bytes",
     "Sum of the resident set sizes of the script's running process group, in bytes.", ()),
    (GaugeMetricFamily, "stap_exporter_script_start_seconds",
     "Seconds from spawn to the appearance of the output (compile plus load) of the"
     " script's last start that produced output.", ()),
    (GaugeMetricFamily, "stap_exporter_script_bpf_memory_bytes",
     "Memory locked by the BPF programs and maps of the script's running processes (their"
     " memlock), in bytes.", ()),
    (GaugeMetricFamily, "stap_exporter_script_module_bytes",
     "Size of the running script's kernel module (kernel runtime), in bytes.", ()),
)
# Only with --bpf-stats: without the kernel's statistics the figures stand still.
PROBE_FAMILIES = (
    (CounterMetricFamily, "stap_exporter_script_probe_seconds",
     "Time the kernel spent running the BPF programs of the script's running processes;"
     " starts again from 0 with each run.", ()),
    (CounterMetricFamily, "stap_exporter_script_probe_runs",
     "Runs of the BPF programs of the script's running processes; starts again from 0 with"
     " each run.", ()),
)


def _families(table):
    return [kind(name, documentation, labels=["script", *labels])
            for kind, name, documentation, labels in table]


class SessionCollector:
    """Per-script lifecycle metrics, read from the manager's sessions."""

    def __init__(self, manager, proc: str = proccost.DEFAULT_PROC, bpf_stats: bool = False):
        self.manager = manager
        self.proc = proc
        self.bpf_stats = bpf_stats
        # script -> (pid, highest CPU seen): a counter must not go down while
        # the same run goes on (a member reaped outside the group takes its
        # time with it); a new run (new pid) starts from its own figure.
        self._cpu_seen: Dict[str, Tuple[int, float]] = {}

    def collect(self):
        sessions = self.manager.all()
        return self._lifecycle(sessions) + self._costs(sessions)

    def _lifecycle(self, sessions):
        up, state, read, starts, restarts, exits, size, queued, reload_failures, series, limit \
            = _families(LIFECYCLE_FAMILIES)
        for s in sessions:
            name = s.name
            up.add_metric([name], 1 if s.state == RUNNING else 0)
            for each in ALL_STATES:
                state.add_metric([name, each], 1 if s.state == each else 0)
            read.add_metric([name], 1 if s.output_read and s.pid else 0)
            starts.add_metric([name], s.starts)
            restarts.add_metric([name], s.restarts)
            for outcome in ("stopped", "error", "exited", "spawn_error"):
                exits.add_metric([name, outcome], s.exits.get(outcome, 0))
            size.add_metric([name], s.last_output_bytes)
            queued.add_metric([name], 1 if s.queued else 0)
            reload_failures.add_metric([name], s.edit_failures)
            series.add_metric([name], s.last_series)
            if s.max_series is not None:
                limit.add_metric([name], s.max_series)
        return [up, state, read, starts, restarts, exits, size, queued, reload_failures, series,
                limit]

    def _costs(self, sessions):
        cpu, memory, start, bpf_memory, module = _families(COST_FAMILIES)
        probe_seconds, probe_runs = _families(PROBE_FAMILIES)
        live = {s.pid: s for s in sessions if s.pid}
        costs = proccost.measure({pid: s.script.module for pid, s in live.items()}, self.proc)
        seen = {}
        for pid, cost in costs.items():
            name = live[pid].name
            last_pid, highest = self._cpu_seen.get(name, (None, 0.0))
            value = max(cost.cpu_seconds, highest) if last_pid == pid else cost.cpu_seconds
            seen[name] = (pid, value)
            cpu.add_metric([name], value)
            memory.add_metric([name], cost.resident_bytes)
            kernel = cost.kernel
            if kernel is not None and kernel.bpf:
                bpf_memory.add_metric([name], kernel.memory_bytes)
                probe_seconds.add_metric([name], kernel.probe_seconds)
                probe_runs.add_metric([name], kernel.probe_runs)
            elif kernel is not None:
                module.add_metric([name], kernel.memory_bytes)
        self._cpu_seen = seen
        for s in sessions:
            seconds = start_seconds(s)
            if seconds is not None:
                start.add_metric([s.name], seconds)
        families = [cpu, memory, start, bpf_memory, module]
        return families + [probe_seconds, probe_runs] if self.bpf_stats else families


class SelfMetrics:
    """The registry and the per-request instruments."""

    def __init__(self, manager, registry=None, bpf_stats: bool = False):
        self.registry = registry or CollectorRegistry()
        self.registry.register(SessionCollector(manager, bpf_stats=bpf_stats))
        ProcessCollector(registry=self.registry)
        Info("stap_exporter_build", "stap-exporter's version.",
             registry=self.registry).info({"version": __version__})
        self.scrape_duration = Histogram(
            "stap_exporter_scrape_duration_seconds",
            "Time to answer a request for a script, whatever the outcome.",
            ["script"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.scrape_errors = Counter(
            "stap_exporter_scrape_errors",
            "Requests for a script that got no metrics, by reason: not_ready, failed,"
            " unavailable, invalid, busy, series_limit, untrusted_output, untrusted_script,"
            " bad_settings.",
            ["script", "reason"], registry=self.registry)
        self.start_duration = Histogram(
            "stap_exporter_script_start_duration_seconds",
            "Seconds from spawn to the appearance of the output, one observation per start"
            " that produced output.", ["script"], buckets=START_BUCKETS, registry=self.registry)
        self._duration_children = {}
        self._starts_noted: Dict[str, float] = {}  # script -> started_at observed
        self.manager = manager

    def observe(self, script: str, seconds: float, error_reason=None) -> None:
        child = self._duration_children.get(script)
        if child is None:
            child = self._duration_children[script] = self.scrape_duration.labels(script)
        child.observe(seconds)
        if error_reason is not None:
            self.scrape_errors.labels(script, error_reason).inc()

    def note_start(self, session) -> None:
        """Observe SESSION's start-up time once per start, as soon as it has
        produced output (called after each request for it and at render)."""
        seconds = start_seconds(session)
        if seconds is None or self._starts_noted.get(session.name) == session.started_at:
            return
        self._starts_noted[session.name] = session.started_at
        self.start_duration.labels(session.name).observe(seconds)

    def render(self) -> bytes:
        for session in self.manager.all():
            self.note_start(session)
        return generate_latest(self.registry)
