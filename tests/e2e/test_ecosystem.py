"""What operators expect of a Prometheus exporter: self-metrics, gzip,
health endpoints, typed metrics from script comments, validation, JSON logs."""

import gzip
import json

from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for, write_script

TYPED = """# fake: lines=3
// prometheus: TYPE fake_reads_total counter
// prometheus: HELP fake_reads_total Times the output was produced.
// prometheus: TYPE fake_up gauge
// prometheus: HELP fake_up 1 while the script runs.
# prometheus: TYPE fake_uptime_seconds gauge
probe prometheus { }
"""


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_self_metrics(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    write_script(scripts, "broken.stp", "fail")
    exp = exporter_factory()
    exp.get_until("/a.stp")
    exp.get_until("/broken.stp", 502)
    r = exp.get("/metrics")
    assert r.status == 200
    assert r.header("Content-Type").startswith("text/plain; version=0.0.4")
    fams = families(r.text)
    for name in ("stap_exporter_script_up", "stap_exporter_script_starts",
                 "stap_exporter_script_exits", "stap_exporter_script_restarts",
                 "stap_exporter_scrape_duration_seconds", "stap_exporter_scrape_errors",
                 "stap_exporter_script_output_bytes", "stap_exporter_build_info",
                 "process_resident_memory_bytes"):
        assert name in fams, name
        assert fams[name].documentation, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in fams.values() for s in f.samples}
    assert samples[("stap_exporter_script_up", (("script", "a.stp"),))] == 1
    assert samples[("stap_exporter_script_up", (("script", "broken.stp"),))] == 0
    assert samples[("stap_exporter_script_starts_total", (("script", "a.stp"),))] == 1
    assert samples[("stap_exporter_script_exits_total",
                    (("outcome", "error"), ("script", "broken.stp")))] >= 1
    assert samples[("stap_exporter_scrape_errors_total",
                    (("reason", "failed"), ("script", "broken.stp")))] >= 1
    assert samples[("stap_exporter_script_output_bytes", (("script", "a.stp"),))] > 50
    assert samples[("stap_exporter_scrape_duration_seconds_count", (("script", "a.stp"),))] >= 1
    build = fams["stap_exporter_build_info"].samples[0]
    assert build.labels["version"]


def test_script_named_metrics_still_works(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "metrics.stp")
    exp = exporter_factory()
    r = exp.get_until("/metrics.stp")
    assert "fake_up" in r.text
    assert "stap_exporter_script_up" in exp.get("/metrics").text


def test_gzip_when_asked_and_worth_it(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "big.stp", "pad=20000")
    write_script(scripts, "small.stp", "lines=1")
    exp = exporter_factory()
    plain = exp.get_until("/big.stp")
    assert plain.header("Content-Encoding") is None
    assert plain.header("Vary") == "Accept-Encoding"
    zipped = exp.get("/big.stp", headers={"Accept-Encoding": "gzip"})
    assert zipped.status == 200
    assert zipped.header("Content-Encoding") == "gzip"
    assert zipped.header("Vary") == "Accept-Encoding"
    body = gzip.decompress(zipped.body)
    assert len(zipped.body) < len(body) / 5
    assert body.splitlines()[0] == plain.body.splitlines()[0]
    small = exp.get_until("/small.stp", headers={"Accept-Encoding": "gzip"})
    assert small.header("Content-Encoding") is None  # not worth it
    refused = exp.get("/big.stp", headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert refused.header("Content-Encoding") is None
    m = exp.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert m.header("Content-Encoding") == "gzip"
    assert b"stap_exporter_script_up" in gzip.decompress(m.body)


def test_missing_final_newline_is_added(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "nonl.stp", "no_newline")
    exp = exporter_factory()
    r = exp.get_until("/nonl.stp")
    assert r.body.endswith(b"\n") and not r.body.endswith(b"\n\n")
    families(r.text)


def test_health_endpoints(dirs, exporter_factory):
    exp = exporter_factory()
    assert exp.get("/-/healthy").status == 200
    assert exp.get("/-/ready").status == 200
    assert not exp.children()


def test_ready_is_503_when_scripts_directory_is_unreadable(dirs, exporter_factory):
    import signal
    scripts, _ = dirs
    exp = exporter_factory()
    moved = str(scripts) + ".moved"
    import os
    os.rename(str(scripts), moved)
    try:
        exp.signal(signal.SIGHUP)
        r = wait_for(lambda: (lambda r: r if r.status == 503 else None)(exp.get("/-/ready")))
        assert "cannot read scripts directory" in r.text
        assert "cannot read scripts directory" in exp.get("/").text
    finally:
        os.rename(moved, str(scripts))
    exp.signal(signal.SIGHUP)
    wait_for(lambda: exp.get("/-/ready").status == 200)


def test_declared_types_and_help_are_inserted(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "typed.stp", body=TYPED)
    exp = exporter_factory()
    r = exp.get_until("/typed.stp")
    fams = families(r.text)
    assert fams["fake_reads"].type == "counter"
    assert fams["fake_reads"].documentation == "Times the output was produced."
    assert fams["fake_up"].type == "gauge"
    assert fams["fake_uptime_seconds"].type == "gauge"
    lines = r.text.splitlines()
    assert lines[0] == "# HELP fake_up 1 while the script runs."
    assert lines[1] == "# TYPE fake_up gauge"
    assert lines.index("# TYPE fake_reads_total counter") < \
        [i for i, l in enumerate(lines) if l.startswith("fake_reads_total")][0]
    assert r.text.count("# TYPE fake_up ") == 1


def test_validate_rejects_invalid_output(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "bad.stp", "invalid")
    write_script(scripts, "good.stp")
    exp = exporter_factory(["--validate"])
    r = exp.get_until("/bad.stp", 502)
    assert "not valid Prometheus text" in r.text
    assert exp.get_until("/good.stp").status == 200


def test_invalid_output_is_relayed_without_validate(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "bad.stp", "invalid")
    exp = exporter_factory()
    assert b"not prometheus text" in exp.get_until("/bad.stp").body


def test_json_logs_carry_script_and_pid(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "a.stp")
    exp = exporter_factory(["--log-format", "json"])
    exp.get_until("/a.stp")
    line = exp.wait_log(r'"event": "spawned"')
    obj = json.loads(line)
    assert obj["script"] == "a.stp"
    assert isinstance(obj["pid"], int)
    assert obj["level"] == "info"
    for raw in exp.log_lines:
        json.loads(raw)  # every line is JSON


def test_startup_banner(dirs, exporter_factory):
    scripts, _ = dirs
    write_script(scripts, "one.stp")
    write_script(scripts, "two.stp")
    exp = exporter_factory()
    line = exp.wait_log(r"event=started")
    assert "stap-exporter " in line and "listening on 127.0.0.1:" in line
    assert str(scripts) in line and "one.stp, two.stp" in line
