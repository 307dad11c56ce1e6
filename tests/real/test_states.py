"""Honest states, end to end with the real daemon and fakestap:
an autostart script nobody scrapes is ``running`` and up as soon as its
output exists; a script whose file is not trusted is ``refused`` with the
reason (index and self-metrics) until the file is fixed; a crashing
autostart script shows ``backoff`` with its exit and the next try.  Once
with the real BPF runtime too: looking for its FIFO (without opening it)
turns an unscraped autostart script running and does not disturb stapbpf."""

import os
import re

import pytest

from conftest import wait_for, write_script
from stapexporter_lib.states import ALL_STATES
from stapexporter_lib.web.indexpage import HEADER
from test_realstap_e2e import (COMPILE_TIMEOUT, TICKS, rs, samples, scripts,  # noqa: F401
                               start, write)

DEADLINE = 10.0


def index_row(exp, name):
    """The text index's row of NAME: (state, pid, output cell, last-error column)."""
    for line in exp.get("/").text.split("\n\n")[0].splitlines()[2:]:
        cols = line.split()
        if cols and cols[0] == name:
            return cols[1], cols[2], cols[6], " ".join(cols[len(HEADER) - 1:])
    raise AssertionError("%s not on the index" % name)


def metric(exp, name, **labels):
    """The value of the self-metric NAME with exactly LABELS, or None."""
    text = exp.get("/metrics").text
    want = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
    match = re.search(r"^%s\{%s\} (\S+)$" % (re.escape(name), re.escape(want)), text, re.M)
    return float(match.group(1)) if match else None


def state_of(exp, script):
    """The one state the one-hot gauge marks for SCRIPT (asserting it is one-hot)."""
    values = {s: metric(exp, "stap_exporter_script_state", script=script, state=s)
              for s in ALL_STATES}
    assert sorted(values.values()) == [0.0] * (len(ALL_STATES) - 1) + [1.0], values
    return [s for s, v in values.items() if v == 1][0]


def test_an_autostart_script_nobody_scraped_is_running_and_up(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "count-autostart.stp", "compile=0.5")
    exp = exporter_factory()
    wait_for(lambda: metric(exp, "stap_exporter_script_up", script="count-autostart.stp") == 1,
             timeout=DEADLINE, message="up 1 without a scrape")
    assert state_of(exp, "count-autostart.stp") == "running"
    assert metric(exp, "stap_exporter_script_output_read", script="count-autostart.stp") == 0
    start = metric(exp, "stap_exporter_script_start_seconds", script="count-autostart.stp")
    assert 0.5 <= start < DEADLINE
    state, pid, output, _ = index_row(exp, "count-autostart.stp")
    assert (state, output) == ("running", "unread") and pid.isdigit()
    exp.wait_log(r'event=running script=count-autostart\.stp pid=%s msg="output appeared after'
                 % pid)
    assert "fake_up" in exp.get("/count-autostart.stp").text
    assert metric(exp, "stap_exporter_script_output_read", script="count-autostart.stp") == 1
    assert index_row(exp, "count-autostart.stp")[2].endswith("B")


def test_a_refused_script_shows_its_state_and_reason_until_fixed(dirs, exporter_factory):
    scripts, _ = dirs
    path = write_script(scripts, "loose.stp")
    os.chmod(path, 0o666)
    exp = exporter_factory()
    state, pid, _, reason = index_row(exp, "loose.stp")  # before any request
    assert (state, pid) == ("refused", "-")
    assert "refused to run loose.stp: %s is writable by group and others (mode 0666)" % path \
        in reason
    assert state_of(exp, "loose.stp") == "refused"
    r = exp.get("/loose.stp")
    assert r.status == 403 and "writable by group and others" in r.text, r
    html = exp.get("/", headers={"Accept": "text/html"}).text
    assert '<span class="state refused">refused</span>' in html
    assert "mode 0666" in html
    os.chmod(path, 0o644)
    assert index_row(exp, "loose.stp")[0] == "stopped"  # the index checks again
    assert "fake_up" in exp.get_until("/loose.stp").text
    assert state_of(exp, "loose.stp") == "running"
    assert index_row(exp, "loose.stp")[3] == "-"


def test_a_crashing_autostart_script_shows_backoff_with_its_reason(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "crash-autostart.stp", "exit_after=0.1 exit_status=7")
    exp = exporter_factory()
    row = wait_for(lambda: (lambda r: r[0] == "backoff" and r)(
        index_row(exp, "crash-autostart.stp")), timeout=DEADLINE, message="backoff")
    state, pid, _, reason = row
    assert pid == "-"
    assert re.fullmatch(r"exit status 7 \(restarting in \d+s\)", reason), reason
    wait_for(lambda: state_of(exp, "crash-autostart.stp") == "backoff", timeout=DEADLINE,
             message="backoff in the self-metrics")
    # A request meanwhile is told why (it may meet a restart: wait for one that is not).
    r = wait_for(lambda: (lambda r: r.status == 503 and "exit status 7" in r.text and r)(
        exp.get("/crash-autostart.stp")), timeout=DEADLINE, message="a backoff answer")
    assert "will be restarted in" in r.text, r


@pytest.mark.realstap
def test_a_real_autostart_script_nobody_scraped_is_running_and_serves(start, scripts):
    write(scripts, "autostart-ticks.stp", TICKS)
    exp = start()
    wait_for(lambda: metric(exp, "stap_exporter_script_up", script="autostart-ticks.stp") == 1,
             timeout=COMPILE_TIMEOUT, message="up 1 without a scrape")
    state, _, output, _ = index_row(exp, "autostart-ticks.stp")
    assert (state, output) == ("running", "unread")
    assert metric(exp, "stap_exporter_script_output_read", script="autostart-ticks.stp") == 0
    r = exp.get("/autostart-ticks.stp")
    assert r.status == 200 and "ticks" in samples(r.text), r
    assert metric(exp, "stap_exporter_script_output_read", script="autostart-ticks.stp") == 1
