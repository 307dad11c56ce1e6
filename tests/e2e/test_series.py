"""Series per script and --max-series, end to end with the stand-in
systemtap: the count in /metrics and on the index page matches the body
served, and an output over the limit gets 502 naming both numbers, a scrape
error and one log line."""

import re

from conftest import write_script


def metric(text, name, script, extra=""):
    m = re.search(r'^%s\{%sscript="%s"\} (\S+)$' % (re.escape(name), extra, re.escape(script)),
                  text, re.M)
    return float(m.group(1)) if m else None


def sample_lines(body):
    return [line for line in body.decode().splitlines() if line and not line.startswith("#")]


def index_row(exp, name):
    text = exp.get("/").text
    header = text.splitlines()[1].split()
    row = [line.split() for line in text.splitlines() if line.startswith(name + " ")][0]
    return dict(zip(header, row))


def test_a_script_printing_500_series_under_max_series_200_gets_502(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "wide.stp", "lines=500")
    write_script(scripts, "narrow.stp", "lines=3")
    exp = exporter_factory(["--max-series", "200"])
    exp.get_until("/narrow.stp")
    r = exp.get_until("/wide.stp", 502)
    assert r.header("Content-Type").startswith("text/plain")
    assert r.text == ("Too many series: The script's output has 500 series, more than the"
                      " limit of 200.\n")
    for _ in range(3):
        assert exp.get("/wide.stp").status == 502
    ok = exp.get("/narrow.stp")
    assert ok.status == 200 and len(sample_lines(ok.body)) == 3
    metrics = exp.get("/metrics").text
    assert metric(metrics, "stap_exporter_script_series", "wide.stp") == 500
    assert metric(metrics, "stap_exporter_script_series_limit", "wide.stp") == 200
    assert metric(metrics, "stap_exporter_script_series", "narrow.stp") == 3
    assert metric(metrics, "stap_exporter_scrape_errors_total", "wide.stp",
                  'reason="series_limit",') == 4
    assert metric(metrics, "stap_exporter_scrape_errors_total", "narrow.stp",
                  'reason="series_limit",') is None
    over = [line for line in exp.log_lines if "event=series-limit" in line]
    assert len(over) == 1, over  # once while it lasts
    assert "script=wide.stp" in over[0] and "500 series" in over[0] and "of 200" in over[0]
    assert index_row(exp, "wide.stp")["SERIES"] == "500"
    assert index_row(exp, "narrow.stp")["SERIES"] == "3"


def test_without_a_limit_every_output_is_served_and_counted(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "wide.stp", "lines=500 pad=40000",
                 body="// prometheus: TYPE fake_line gauge\n"
                      "// prometheus: HELP fake_line A line.\nprobe prometheus { }\n")
    exp = exporter_factory()
    assert index_row(exp, "wide.stp")["SERIES"] == "-"  # nothing read yet
    r = exp.get_until("/wide.stp")
    assert len(sample_lines(r.body)) == 500 and b"# TYPE fake_line gauge" in r.body
    metrics = exp.get("/metrics").text
    assert metric(metrics, "stap_exporter_script_series", "wide.stp") == 500
    assert "stap_exporter_script_series_limit{" not in metrics
    # No BPF program, no module, no --bpf-stats: none of the kernel figures.
    for name in ("stap_exporter_script_bpf_memory_bytes{", "stap_exporter_script_module_bytes{",
                 "stap_exporter_script_probe_seconds", "stap_exporter_script_probe_runs"):
        assert name not in metrics, name
    row = index_row(exp, "wide.stp")
    assert (row["SERIES"], row["PROBE"], row["KMEM"]) == ("500", "-", "-")


def test_a_scripts_own_max_series_overrides_the_command_lines(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "wide.stp", "lines=500",
                 body="# stap-exporter: max-series=600\nprobe prometheus { }\n")
    write_script(scripts, "narrow.stp", "lines=3",
                 body="# stap-exporter: max-series=2\nprobe prometheus { }\n")
    exp = exporter_factory(["--max-series", "200"])
    r = exp.get_until("/wide.stp")
    assert len(sample_lines(r.body)) == 500
    r = exp.get_until("/narrow.stp", 502)
    assert r.text == ("Too many series: The script's output has 3 series, more than the"
                      " limit of 2.\n")
    metrics = exp.get("/metrics").text
    assert metric(metrics, "stap_exporter_script_series_limit", "wide.stp") == 600
    assert metric(metrics, "stap_exporter_script_series_limit", "narrow.stp") == 2
    assert "max-series=2" in index_row(exp, "narrow.stp")["SETTINGS"]
