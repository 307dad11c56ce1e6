"""The real scrapers: a Prometheus server, promtool, and Performance
Co-Pilot's pmdaopenmetrics, all from Debian's packages, against a running
exporter (one stand-in script, and one on the real BPF runtime)."""

import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest

import realstap
from conftest import FAKESTAP, ROOT, Exporter, wait_for, write_script
from stapexporter_lib import cli

pytestmark = pytest.mark.peers

FAKE = """# fake: lines=3
// prometheus: TYPE fake_reads_total counter
// prometheus: HELP fake_reads_total Times the stand-in produced its output.
// prometheus: TYPE fake_up gauge
// prometheus: HELP fake_up 1 while the stand-in runs.
// prometheus: TYPE fake_uptime_seconds gauge
// prometheus: HELP fake_uptime_seconds Seconds since the stand-in started.
probe prometheus { }
"""

TICKS = """// prometheus: TYPE ticks_total counter
// prometheus: HELP ticks_total 100 ms timer ticks per CPU.
global ticks%
probe timer.ms(100) { ticks[cpu()]++ }
probe prometheus { @prometheus_dump_array1(ticks, "ticks_total", "cpu") }
"""


def need(tool):
    path = shutil.which(tool)
    if not path:
        pytest.skip("%s is not installed (Debian package: %s)" % (
            tool, {"prometheus": "prometheus", "promtool": "prometheus",
                   "pminfo": "pcp"}.get(tool, tool)))
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    if realstap.skip_reason():
        return None
    return realstap.prepare(tmp_path_factory.mktemp("realstap"))


@pytest.fixture
def peer_exporter(tmp_path, rs):
    scripts, fake_procfs = tmp_path / "scripts", tmp_path / "procfs"
    scripts.mkdir()
    fake_procfs.mkdir()
    write_script(scripts, "fake.stp", body=FAKE, executable=True)
    extra = ()
    stap = FAKESTAP
    if rs is not None:
        (scripts / "ticks.stp").write_text(TICKS)
        stap = rs.stap
        extra = [cli.default_procfs_dirs()[1]]
    exp = Exporter(scripts, fake_procfs, stap=stap, extra_procfs=extra)
    exp.real = rs is not None
    try:
        yield exp
    finally:
        exp.stop()


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def start_prometheus(tmp_path, config):
    """A real Prometheus on a free loopback port scraping as CONFIG (a dict)
    says, its data and log under TMP_PATH: (process, query URL prefix)."""
    prometheus = need("prometheus")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    with open(str(tmp_path / "prometheus.log"), "wb") as log:
        proc = subprocess.Popen([prometheus, "--config.file=%s" % cfg,
                                 "--storage.tsdb.path=%s" % (tmp_path / "data"),
                                 "--web.listen-address=127.0.0.1:%d" % port],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, "http://127.0.0.1:%d/api/v1/query?query=" % port


def query(api, q):
    """The result vector of the PromQL query Q ([] while Prometheus cannot
    answer yet)."""
    try:
        data = json.loads(get(api + urllib.parse.quote(q)))
    except OSError:
        return []
    return data["data"]["result"] if data.get("status") == "success" else []


def test_promtool_accepts_self_metrics_and_typed_output(peer_exporter):
    promtool = need("promtool")
    exp = peer_exporter
    bodies = {"/fake.stp": exp.get_until("/fake.stp").body}
    if exp.real:
        bodies["/ticks.stp"] = exp.get_until("/ticks.stp", timeout=60).body
    bodies["/metrics"] = exp.get("/metrics").body
    for path, body in bodies.items():
        proc = subprocess.run([promtool, "check", "metrics"], input=body,
                              capture_output=True, timeout=30)
        assert proc.returncode == 0, (path, proc.stdout, proc.stderr, body[:500])


@pytest.mark.realstap
def test_promtool_accepts_bundled_bpf_examples(tmp_path, rs):
    promtool = need("promtool")
    if rs is None:
        pytest.skip(realstap.skip_reason())
    examples = os.path.join(ROOT, "examples", "bpf")
    exp = Exporter(examples, tmp_path, stap=rs.stap,
                   extra_procfs=[cli.default_procfs_dirs()[1]])
    try:
        for name in sorted(os.listdir(examples)):
            body = exp.get_until("/" + name, timeout=60).body
            proc = subprocess.run([promtool, "check", "metrics"], input=body,
                                  capture_output=True, timeout=30)
            assert proc.returncode == 0, (name, proc.stdout, proc.stderr, body[:500])
    finally:
        exp.stop()


def test_prometheus_scrapes_the_exporter(peer_exporter, tmp_path):
    exp = peer_exporter
    target = "127.0.0.1:%d" % exp.port
    jobs = [("fake", "/fake.stp"), ("self", "/metrics")]
    if exp.real:
        jobs.append(("ticks", "/ticks.stp"))
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
              "scrape_configs": [{"job_name": job, "metrics_path": path,
                                  "static_configs": [{"targets": [target]}]}
                                 for job, path in jobs]}
    prom, api = start_prometheus(tmp_path, config)
    try:
        def all_up():
            up = {r["metric"]["job"]: r["value"][1] for r in query(api, "up")}
            return up if len(up) == len(jobs) and set(up.values()) == {"1"} else None
        wait_for(all_up, timeout=60, interval=0.5, message="every target up == 1")
        first = wait_for(lambda: query(api, "fake_reads_total"), timeout=20, interval=0.5)
        assert first[0]["metric"]["script"] == "fake.stp"
        assert first[0]["metric"]["job"] == "fake"
        v0 = float(first[0]["value"][1])
        wait_for(lambda: float(query(api, "fake_reads_total")[0]["value"][1]) > v0, timeout=20,
                 interval=0.5, message="fake_reads_total to increase in Prometheus")
        # The self job's last scrape may predate the script's start: wait for one after it.
        wait_for(lambda: query(api, 'stap_exporter_script_up{script="fake.stp"}')[0]["value"][1]
                 == "1", timeout=20, interval=0.5, message="stap_exporter_script_up to be 1")
        if exp.real:
            ticks = wait_for(lambda: query(api, "ticks_total"), timeout=30, interval=0.5)
            assert "cpu" in ticks[0]["metric"]
            t0 = float(ticks[0]["value"][1])
            wait_for(lambda: float(query(api, "ticks_total")[0]["value"][1]) > t0, timeout=20,
                     interval=0.5, message="real ticks_total to increase in Prometheus")
    finally:
        prom.terminate()
        prom.wait(20)


PMDA_DIR = "/var/lib/pcp/pmdas/openmetrics"
PCP_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"  # pmcd and the PMDA need Debian's python3


def pcp_env():
    return dict(os.environ, PATH=PCP_PATH)


def test_pcp_openmetrics_collects_the_script(peer_exporter):
    pminfo = need("pminfo")
    if os.geteuid() != 0:
        pytest.skip("configuring pmcd and its PMDAs needs root")
    if not os.path.isdir(PMDA_DIR):
        pytest.skip("pmdaopenmetrics is not installed (Debian package: pcp)")
    exp = peer_exporter
    exp.get_until("/fake.stp")
    name = "stapexp%d" % exp.port
    url_file = os.path.join(PMDA_DIR, "config.d", name + ".url")
    with open(url_file, "w") as f:
        f.write("http://127.0.0.1:%d/fake.stp\n" % exp.port)
    try:
        subprocess.run(["/etc/init.d/pmcd", "start"], env=pcp_env(), capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
        proc = subprocess.run(["./Install"], cwd=PMDA_DIR, env=pcp_env(), capture_output=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        def value():
            out = subprocess.run([pminfo, "-f", "openmetrics.%s.fake_reads_total" % name],
                                 env=pcp_env(), capture_output=True, timeout=20).stdout.decode()
            for line in out.splitlines():
                if "script:fake.stp" in line and "value" in line:
                    return float(line.rsplit("value", 1)[1])
            return None
        v0 = wait_for(value, timeout=30, interval=0.5, message="pminfo to show the metric")
        wait_for(lambda: (value() or 0) > v0, timeout=30, interval=0.5,
                 message="the PCP value to change")
        out = subprocess.run([pminfo, "-f", "openmetrics.%s" % name], env=pcp_env(),
                             capture_output=True, timeout=20).stdout.decode()
        assert "openmetrics.%s.fake_up" % name in out
    finally:
        os.unlink(url_file)
        subprocess.run(["./Install"], cwd=PMDA_DIR, env=pcp_env(), capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL)
        subprocess.run(["/etc/init.d/pmcd", "stop"], env=pcp_env(), capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
