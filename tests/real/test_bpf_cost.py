"""What a script costs the kernel, on the REAL SystemTap BPF runtime: with
--bpf-stats a 10 ms timer script's probe time and run count grow between two
scrapes of /metrics, its BPF memory is above zero and its series count is
the body's; the statistics are held on by a descriptor of the exporter's,
and kernel.bpf_stats_enabled is never changed, with the option or without."""

import os
import re

import pytest

from conftest import wait_for
from stapexporter_lib.scripts import bpfstats
from test_realstap_e2e import (first_then_ok, rs, scripts, start,  # noqa: F401 (fixtures)
                               stap_children, write)

pytestmark = pytest.mark.realstap

TICKS_10MS = """\
global ticks%
probe timer.ms(10) { ticks[cpu()]++ }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
"""


def sysctl():
    with open(bpfstats.SYSCTL) as f:
        return f.read().strip()


def metric(text, name, script):
    m = re.search(r'^%s\{script="%s"\} (\S+)$' % (re.escape(name), re.escape(script)), text,
                  re.M)
    return float(m.group(1)) if m else None


def stats_descriptors(pid):
    """PID's descriptors that hold the BPF statistics on."""
    held = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:bpf-stats":
                held.append(fd)
        except OSError:
            continue
    return held


def index_row(exp, name):
    lines = exp.get("/").text.splitlines()
    header = lines[1].split()
    return dict(zip(header, [line.split() for line in lines if line.startswith(name + " ")][0]))


def test_probe_time_and_runs_grow_between_two_scrapes_with_bpf_stats(start, scripts):
    before = sysctl()
    write(scripts, "ticks.stp", TICKS_10MS)
    exp = start(["--bpf-stats"])
    exp.wait_log(r"event=bpf-stats .*BPF_ENABLE_STATS descriptor held")
    assert stats_descriptors(exp.proc.pid), "the exporter holds no bpf-stats descriptor"
    body = first_then_ok(exp, "/ticks.stp").body
    # Its loader does not inherit the descriptor: the statistics end with the exporter.
    for pid, _cmd in stap_children(exp):
        assert not stats_descriptors(pid), pid
    text = exp.get("/metrics").text
    first = (metric(text, "stap_exporter_script_probe_seconds_total", "ticks.stp"),
             metric(text, "stap_exporter_script_probe_runs_total", "ticks.stp"))
    assert None not in first, text

    def grown():
        now = exp.get("/metrics").text
        return (metric(now, "stap_exporter_script_probe_seconds_total", "ticks.stp") > first[0]
                and metric(now, "stap_exporter_script_probe_runs_total", "ticks.stp")
                > first[1]) and now
    text = wait_for(grown, timeout=15, interval=0.2, message="probe time and runs to grow")
    assert metric(text, "stap_exporter_script_bpf_memory_bytes", "ticks.stp") > 0
    samples = [line for line in body.decode().splitlines() if line and line[0] != "#"]
    assert samples and metric(text, "stap_exporter_script_series", "ticks.stp") == len(samples)
    row = index_row(exp, "ticks.stp")
    assert re.fullmatch(r"\d+\.\d\d%", row["PROBE"]) and row["KMEM"].endswith(("KiB", "MiB"))
    assert sysctl() == before
    exp.stop()
    assert sysctl() == before


def test_without_bpf_stats_nothing_is_turned_on(start, scripts):
    before = sysctl()
    write(scripts, "ticks.stp", TICKS_10MS)
    exp = start()
    body = first_then_ok(exp, "/ticks.stp").body
    assert not stats_descriptors(exp.proc.pid)
    assert sysctl() == before
    text = exp.get("/metrics").text
    assert "stap_exporter_script_probe_seconds" not in text
    assert "stap_exporter_script_probe_runs" not in text
    # The memory and the series are there all the same.
    assert metric(text, "stap_exporter_script_bpf_memory_bytes", "ticks.stp") > 0
    assert metric(text, "stap_exporter_script_series", "ticks.stp") == len(
        [line for line in body.decode().splitlines() if line and line[0] != "#"])
    assert index_row(exp, "ticks.stp")["PROBE"] == "-"
    exp.stop()
    assert sysctl() == before
    assert "event=bpf-stats" not in exp.log_text()


def test_the_real_kernel_gives_a_close_on_exec_descriptor(rs):
    before = sysctl()
    fd = bpfstats.bpf_enable_stats()
    try:
        assert os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:bpf-stats"
        assert not os.get_inheritable(fd)
        assert sysctl() == before
    finally:
        os.close(fd)
