"""Live scripts end to end, with the stand-in stap: an edit of a running
script takes over while a client scrapes every 20 ms and sees only 200s; a
broken edit leaves the old version serving and its compiler's message on the
index page; a script's own settings (keepalive, autostart, scrape-timeout)
and their refusal.  Every wait is on a condition with a deadline."""

import os
import re
import time

import pytest

from conftest import Scraper, pid_alive, wait_for, write_script

BODY = ('global n\nprobe timer.s(1) { n++ }\n'
        'probe prometheus { @prometheus_dump_array0(n, "n") }\n')
# What fakestap's output holds with lines=4 and not with the default 3.
FOURTH_LINE = b'fake_line{script="live.stp",n="3"} 3'
# An edit's new output is served within this many seconds of the write.
TAKE_OVER = 3.0


def replace(path, old, new, rename=True):
    """Change OLD to NEW in the file PATH: written to a new file renamed into
    place (as editors and deployment tools do), or rewritten in place."""
    with open(path) as f:
        text = f.read()
    assert old in text
    text = text.replace(old, new)
    target = path + ".new" if rename else path
    with open(target, "w") as f:
        f.write(text)
    if rename:
        os.chmod(target, 0o644)
        os.rename(target, path)
    return time.monotonic()


def index_row(exporter, name):
    """The cells of NAME's row in the text index."""
    for line in exporter.get("/").text.splitlines():
        if line.startswith(name + " "):
            return line.split()
    raise AssertionError("no index row for %s" % name)


def pid_of(exporter, name):
    return int(index_row(exporter, name)[2])


@pytest.mark.parametrize("mode,rename", [("fifo", True), ("file", False)])
def test_an_edit_takes_over_with_only_200s(dirs, exporter_factory, mode, rename):
    """The BPF runtime's FIFO and the kernel runtime's file; a rename into
    place and a write in place."""
    scripts, _ = dirs
    path = write_script(scripts, "live.stp", "mode=%s compile=0.5" % mode)
    exp = exporter_factory()
    exp.get_until("/live.stp")
    old_pid = pid_of(exp, "live.stp")
    scraper = Scraper(exp, "/live.stp")
    edited = replace(path, "compile=0.5", "compile=0.5 lines=4", rename)
    wait_for(lambda: scraper.first(FOURTH_LINE), timeout=10, message="the new output")
    wait_for(lambda: not pid_alive(old_pid), message="the old version to stop")
    time.sleep(0.2)  # a few more scrapes of the new version alone
    failures = scraper.finish()
    assert not failures, failures[:5]
    assert scraper.first(FOURTH_LINE) - edited < TAKE_OVER
    meanwhile = [t for t, _s, body in scraper.answers
                 if edited < t < scraper.first(FOURTH_LINE)]
    assert len(meanwhile) > 10, "the old version answered while the new one compiled"
    new_module = "stapexp_%d__live" % exp.proc.pid  # the second name of live.stp
    exp.wait_log(r"event=edited script=live\.stp module=%s " % new_module)
    line = exp.wait_log(r"event=edited script=live\.stp pid=\d+ module=%s .*took over"
                        % new_module)
    exp.wait_log(r"event=stopped script=live\.stp pid=%d " % old_pid)
    new_pid = int(re.search(r"pid=(\d+)", line).group(1))
    assert exp.settled_children(1) == [new_pid]
    assert index_row(exp, "live.stp")[1:5:3] == ["running", "2"]  # state, starts


def test_a_broken_edit_keeps_the_200s_coming_and_shows_the_compilers_error(
        dirs, exporter_factory):
    scripts, _ = dirs
    path = write_script(scripts, "live.stp", "mode=fifo")
    exp = exporter_factory()
    exp.get_until("/live.stp")
    old_pid = pid_of(exp, "live.stp")
    scraper = Scraper(exp, "/live.stp")
    # The compiler's message carries a terminal escape: shown escaped.
    replace(path, "mode=fifo", "mode=fifo fail stderr_hex=%s" % b"\x1b]0;owned\x07".hex())
    exp.wait_log(r"event=edit-failed script=live\.stp", timeout=10)
    text = exp.get("/").text
    assert "edit not applied, the running version goes on: the new version failed" in text
    assert "live.stp: the edited version's last lines of standard error:" in text
    assert "semantic error: fake failure in live.stp: unresolved symbol" in text
    assert "\\x1b]0;owned\\x07" in text and "\x1b" not in text
    page = exp.get("/", headers={"Accept": "text/html"}).text
    assert "semantic error: fake failure in live.stp" in page and "\x1b" not in page
    assert 'stap_exporter_script_reload_failures_total{script="live.stp"} 1.0' in \
        exp.get("/metrics").text
    assert pid_of(exp, "live.stp") == old_pid
    time.sleep(1.5)  # the watcher looks again: a failed edit is not retried, nor logged again
    assert len([l for l in exp.log_lines if "event=edit-failed" in l]) == 1
    # A fixed file takes over.
    replace(path, "fail", "lines=4")
    wait_for(lambda: scraper.first(FOURTH_LINE), timeout=10, message="the fixed version")
    failures = scraper.finish()
    assert not failures, failures[:5]
    assert "edit not applied" not in exp.get("/").text


def with_settings(scripts, name, settings, directives=""):
    return write_script(scripts, name, directives,
                        body="# stap-exporter: %s\n%s" % (settings, BODY))


def test_a_keepalive_setting_stops_that_script_alone(dirs, exporter_factory):
    scripts, _ = dirs
    with_settings(scripts, "quick.stp", "keepalive=1")
    write_script(scripts, "steady.stp")
    exp = exporter_factory()
    exp.get_until("/quick.stp")
    exp.get_until("/steady.stp")
    quick, steady = pid_of(exp, "quick.stp"), pid_of(exp, "steady.stp")
    exp.wait_log(r'event=stopping script=quick\.stp pid=%d reason="idle for 1s"' % quick)
    wait_for(lambda: not pid_alive(quick), message="quick.stp to stop")
    time.sleep(1.5)  # longer than quick.stp's keepalive
    assert pid_alive(steady) and index_row(exp, "steady.stp")[1] == "running"
    assert index_row(exp, "quick.stp")[1] == "stopped"
    assert "keepalive=1,autostart=no,scrape-timeout=5" in index_row(exp, "quick.stp")
    assert "keepalive=never,autostart=no,scrape-timeout=5" in index_row(exp, "steady.stp")


def test_an_autostart_setting_starts_the_script_at_launch(dirs, exporter_factory):
    scripts, _ = dirs
    with_settings(scripts, "heartbeat.stp", "autostart=yes")
    write_script(scripts, "lazy.stp")
    exp = exporter_factory()
    exp.wait_log(r"event=autostart script=heartbeat\.stp")
    exp.wait_log(r"event=running script=heartbeat\.stp", timeout=15)
    assert not [l for l in exp.log_lines if "event=access" in l], "a request was made"
    assert not [l for l in exp.log_lines if "script=lazy.stp" in l]
    assert index_row(exp, "heartbeat.stp")[1] == "running"


def test_a_wrong_setting_refuses_that_script_alone_naming_the_key(dirs, exporter_factory):
    scripts, _ = dirs
    path = with_settings(scripts, "bad.stp", "keepalive=soon")
    write_script(scripts, "good.stp")
    exp = exporter_factory()
    for _ in range(3):
        r = exp.get("/bad.stp")
        assert r.status == 403, r
        assert r.text == ("Script refused: refused to run bad.stp: setting keepalive=soon:"
                          " expected a positive number of seconds or never\n")
    assert exp.get_until("/good.stp").status == 200
    row = " ".join(index_row(exp, "bad.stp"))
    assert " refused " in row and "setting keepalive=soon" in row
    refused = [l for l in exp.log_lines if "event=refused script=bad.stp" in l]
    assert len(refused) == 1 and "keepalive=soon" in refused[0]
    assert not [l for l in exp.log_lines if "event=spawned script=bad.stp" in l]
    replace(path, "keepalive=soon", "keepalive=60")
    assert exp.get_until("/bad.stp", timeout=15).status == 200


def test_a_scrape_timeout_setting_overrides_the_command_line(dirs, exporter_factory):
    """Both scripts take 1.5 s to write their output: with --scrape-timeout
    0.5 the one that allows itself 5 s is served, the other is not."""
    scripts, _ = dirs
    with_settings(scripts, "patient.stp", "scrape-timeout=5", "mode=fifo write_delay=1.5")
    write_script(scripts, "hasty.stp", "mode=fifo write_delay=1.5")
    exp = exporter_factory(["--scrape-timeout", "0.5"])
    assert exp.get_until("/patient.stp").status == 200
    exp.get("/hasty.stp")
    exp.wait_log(r"event=running script=hasty\.stp")
    r = exp.get("/hasty.stp")
    assert r.status == 503 and "Script output unavailable" in r.text, r
