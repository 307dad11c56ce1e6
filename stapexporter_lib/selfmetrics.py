"""The exporter's own metrics, served at ``/metrics`` through prometheus_client.

A registry of our own (not the library's global default).  Per-script state
(up, starts, exits, restarts, output size) is read from the sessions when
``/metrics`` is scraped, so keeping it costs the hot path nothing; only the
scrape duration histogram and the error counter are updated per request.
"""

from prometheus_client import (CollectorRegistry, Counter, Histogram, Info,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__
from .states import RUNNING

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Scrapes are fast (sub-millisecond) unless a script is slow to produce output.
DURATION_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class SessionCollector:
    """Per-script lifecycle metrics, read from the manager's sessions."""

    def __init__(self, manager):
        self.manager = manager

    def collect(self):
        up = GaugeMetricFamily("stap_exporter_script_up",
                               "1 when the script is running and its output has been read.",
                               labels=["script"])
        starts = CounterMetricFamily("stap_exporter_script_starts",
                                     "Times the script's process was started.",
                                     labels=["script"])
        restarts = CounterMetricFamily("stap_exporter_script_restarts",
                                       "Automatic restarts of an autostart script after it"
                                       " exited.", labels=["script"])
        exits = CounterMetricFamily("stap_exporter_script_exits",
                                    "Ends of the script's process, by outcome: stopped (by"
                                    " the exporter), error (exited non-zero or killed),"
                                    " exited (status 0 on its own), spawn_error.",
                                    labels=["script", "outcome"])
        size = GaugeMetricFamily("stap_exporter_script_output_bytes",
                                 "Size of the script's last output read, in bytes.",
                                 labels=["script"])
        for s in self.manager.all():
            name = s.name
            up.add_metric([name], 1 if s.state == RUNNING else 0)
            starts.add_metric([name], s.starts)
            restarts.add_metric([name], s.restarts)
            for outcome in ("stopped", "error", "exited", "spawn_error"):
                exits.add_metric([name, outcome], s.exits.get(outcome, 0))
            size.add_metric([name], s.last_output_bytes)
        return [up, starts, restarts, exits, size]


class SelfMetrics:
    """The registry and the per-request instruments."""

    def __init__(self, manager, registry=None):
        self.registry = registry or CollectorRegistry()
        self.registry.register(SessionCollector(manager))
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
            " unavailable, busy, invalid.", ["script", "reason"], registry=self.registry)
        self._duration_children = {}

    def observe(self, script: str, seconds: float, error_reason=None) -> None:
        child = self._duration_children.get(script)
        if child is None:
            child = self._duration_children[script] = self.scrape_duration.labels(script)
        child.observe(seconds)
        if error_reason is not None:
            self.scrape_errors.labels(script, error_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
