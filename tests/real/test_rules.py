"""The shipped Prometheus rules: promtool checks them and runs their unit
tests, and every self-metric they use is one the exporter serves."""

import os
import re
import subprocess

import pytest
import yaml

from conftest import ROOT
from stapexporter_lib.web.selfmetrics import SelfMetrics
from test_peers import need

RULES_DIR = os.path.join(ROOT, "rules")
RULES = os.path.join(RULES_DIR, "stap-exporter.rules.yml")
RULES_TESTS = os.path.join(RULES_DIR, "stap-exporter.rules.test.yml")


def promtool(*args):
    proc = subprocess.run([need("promtool")] + list(args), cwd=RULES_DIR, timeout=120,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


@pytest.mark.peers
def test_promtool_check_rules():
    code, out = promtool("check", "rules", RULES)
    assert code == 0 and "SUCCESS" in out, out


@pytest.mark.peers
def test_promtool_test_rules():
    code, out = promtool("test", "rules", RULES_TESTS)
    assert code == 0 and "SUCCESS" in out, out


def served_names():
    """Every sample name /metrics can serve (counters with _total, histograms
    with _bucket, _sum and _count)."""
    class NoSessions:
        def all(self):
            return []
    names = set()
    for family in SelfMetrics(NoSessions(), bpf_stats=True).registry.collect():
        suffixes = {"counter": ["_total"], "info": ["_info"],
                    "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_the_rules_use_only_served_metrics():
    with open(RULES) as f:
        groups = yaml.safe_load(f)["groups"]
    used = set()
    for group in groups:
        for rule in group["rules"]:
            # Recorded names (level:metric:operation) are the rules' own.
            expr = re.sub(r"[\w]*:[\w:]+", "", rule["expr"])
            used.update(re.findall(r"\bstap_exporter_\w+", expr))
    assert {"stap_exporter_script_probe_seconds_total", "stap_exporter_script_series_limit",
            "stap_exporter_scrape_errors_total"} <= used, used
    assert used <= served_names(), used - served_names()
