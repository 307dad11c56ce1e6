"""Per-script cost in the self-metrics: CPU time and memory of a script's
process group read from /proc (unit tests on a fixture tree, and end to end
with a stand-in script that burns CPU in a child and holds memory), and the
time a start takes to produce its first output."""

import os
import re
import subprocess

import pytest

from conftest import pid_alive, wait_for, write_script
from stapexporter_lib.scripts import proccost
from test_peers import need

TICKS = proccost.CLOCK_TICKS
PAGE = proccost.PAGE_SIZE
HOLD = 64 * 1024 * 1024


def stat_line(pid, comm, pgrp, utime, stime, cutime=0, cstime=0, rss=0):
    """A /proc/PID/stat line with the fields proccost reads (others 0)."""
    fields = ["S", "1", str(pgrp), str(pgrp)] + ["0"] * 7 + [
        str(utime), str(stime), str(cutime), str(cstime)] + ["0"] * 6 + [str(rss)] + ["0"] * 28
    return "%d (%s) %s\n" % (pid, comm, " ".join(fields))


def fake_proc(tmp_path, entries):
    proc = tmp_path / "proc"
    proc.mkdir()
    for pid, text in entries.items():
        (proc / str(pid)).mkdir()
        if text is not None:
            (proc / str(pid) / "stat").write_text(text)
    (proc / "self").mkdir()  # not a pid: ignored
    (proc / "meminfo").write_text("MemTotal: 1 kB\n")
    return str(proc)


def test_group_costs_sum_each_process_group(tmp_path):
    proc = fake_proc(tmp_path, {
        100: stat_line(100, "stap", 100, 2 * TICKS, TICKS, cutime=TICKS, rss=1000),
        101: stat_line(101, "stapbpf", 100, TICKS, 0, rss=500),
        # A command name with spaces and parentheses does not shift the fields.
        102: stat_line(102, "odd ) (name", 100, 0, TICKS, rss=1),
        200: stat_line(200, "other", 200, 50 * TICKS, 0, rss=9999),
        300: stat_line(300, "unrelated", 300, 7 * TICKS, 0, rss=7),
        400: "garbage without fields",
        401: None,  # vanished between the listing and the read
    })
    costs = proccost.group_costs([100, 200, 999], proc)
    assert set(costs) == {100, 200}  # no process in group 999: absent
    assert costs[100] == proccost.Cost(cpu_seconds=6.0, resident_bytes=1501 * PAGE,
                                       processes=3)
    assert costs[200].cpu_seconds == 50.0 and costs[200].processes == 1


def test_group_costs_tolerate_a_missing_proc(tmp_path):
    assert proccost.group_costs([1], str(tmp_path / "nope")) == {}
    assert proccost.group_costs([], "/proc") == {}


def test_parse_stat_refuses_what_it_cannot_read():
    assert proccost.parse_stat("") is None
    assert proccost.parse_stat("1 (x) S 1") is None
    assert proccost.parse_stat(stat_line(5, "x", 5, "NaN", 0)) is None


def test_group_costs_on_the_real_proc():
    """Our own process group, read from the real /proc."""
    pgid = os.getpgrp()
    cost = proccost.group_costs([pgid])[pgid]
    assert cost.processes >= 1 and cost.resident_bytes > 1024 * 1024 and cost.cpu_seconds > 0


def metric(exp, name, script):
    """The value of NAME{script=SCRIPT} in /metrics, or None."""
    m = re.search(r'^%s\{script="%s"\} (\S+)$' % (re.escape(name), re.escape(script)),
                  exp.get("/metrics").text, re.M)
    return float(m.group(1)) if m else None


def group_members(pgid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parsed = proccost.parse_stat(open_stat(entry))
            if parsed and parsed[0] == pgid:
                pids.append(int(entry))
    return pids


def open_stat(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            return f.read()
    except OSError:
        return ""


def test_cpu_and_memory_of_a_burning_script_move(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "hog.stp", "burn hold=%d" % HOLD)
    write_script(scripts, "idle.stp")
    exp = exporter_factory()
    exp.get_until("/hog.stp")
    exp.get_until("/idle.stp")
    pid = int(re.search(r"event=spawned script=hog\.stp pid=(\d+)", exp.log_text()).group(1))
    members = wait_for(lambda: len(group_members(pid)) >= 2 and group_members(pid),
                       message="the burner child in the script's process group")
    memory = wait_for(lambda: (metric(exp, "stap_exporter_script_resident_memory_bytes",
                                      "hog.stp") or 0) >= HOLD and
                      metric(exp, "stap_exporter_script_resident_memory_bytes", "hog.stp"),
                      message="the held memory to show")
    idle_memory = metric(exp, "stap_exporter_script_resident_memory_bytes", "idle.stp")
    assert idle_memory and idle_memory < memory - HOLD / 2
    first = metric(exp, "stap_exporter_script_cpu_seconds_total", "hog.stp")
    wait_for(lambda: metric(exp, "stap_exporter_script_cpu_seconds_total", "hog.stp")
             >= first + 0.3, timeout=20, message="the CPU counter to move")
    assert metric(exp, "stap_exporter_script_cpu_seconds_total", "idle.stp") < first + 0.3
    # The index shows the same figures.
    row = [line for line in exp.get("/").text.splitlines() if line.startswith("hog.stp ")]
    cells = row[0].split()
    assert cells[7].endswith("s") and float(cells[7][:-1]) > 0.3, row
    assert cells[8].endswith("MiB") and float(cells[8][:-3]) >= HOLD / 2 ** 20, row
    # A stopped script has no cost series; its whole group is gone.
    exp.stop()
    wait_for(lambda: not any(pid_alive(p) for p in members), message="burner gone")


def test_start_seconds_and_histogram(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "slow.stp", "compile=0.6")
    exp = exporter_factory()
    assert metric(exp, "stap_exporter_script_start_seconds", "slow.stp") is None
    exp.get_until("/slow.stp")
    seconds = metric(exp, "stap_exporter_script_start_seconds", "slow.stp")
    assert 0.6 <= seconds < 10
    for _ in range(2):  # observed once per start, however often it is scraped
        exp.get("/slow.stp")
        assert metric(exp, "stap_exporter_script_start_duration_seconds_count",
                      "slow.stp") == 1.0
    text = exp.get("/metrics").text
    # The observation is the start time reported above (however loaded the machine).
    buckets = {float(le): float(n) for le, n in re.findall(
        r'^stap_exporter_script_start_duration_seconds_bucket\{le="([^"]+)",'
        r'script="slow.stp"\} (\S+)$', text, re.M) if le != "+Inf"}
    assert buckets, text
    assert all(n == (1.0 if le >= seconds else 0.0) for le, n in buckets.items()), buckets


@pytest.mark.peers
def test_promtool_accepts_the_cost_metrics(dirs, exporter_factory):
    promtool = need("promtool")
    scripts, _ = dirs
    write_script(scripts, "a.stp", "child")
    write_script(scripts, "b.stp")
    exp = exporter_factory()
    exp.get_until("/a.stp")
    body = exp.get("/metrics").body
    assert b"stap_exporter_script_cpu_seconds_total{" in body
    assert b"stap_exporter_script_resident_memory_bytes{" in body
    assert b"stap_exporter_script_start_duration_seconds_bucket{" in body
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          timeout=30)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", proc
