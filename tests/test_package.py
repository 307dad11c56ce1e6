"""The Debian package, end to end: built with Debian's tooling from a fresh
clone, checked by lintian, installed with apt-get, its init script started on
a free loopback port with the options file it reads, a bundled example
scraped through the real SystemTap runtime, stopped, and purged.

It changes the system (installs and purges the package), so it runs only
when asked: ``.ci/run`` sets STAP_EXPORTER_PACKAGE_TEST=1 after
``tools/install-deps --package`` (the build dependencies and lintian).
"""

import glob
import os
import re
import shutil
import socket
import subprocess

import pytest

from conftest import processes_matching, wait_for
import realstap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "stap-exporter"
SCRIPTS_DIR = "/etc/stap-exporter"
DEFAULTS = "/etc/default/stap-exporter"
INIT = "/etc/init.d/stap-exporter"
EXAMPLES = "/usr/share/doc/stap-exporter/examples"
PIDFILE = "/run/stap-exporter.pid"
LOGFILE = "/var/log/stap-exporter.log"
EXAMPLE = "timer-ticks.stp"  # BPF-capable: runs with the quick start's runtime
REQUIRED_DEPENDS = ("python3-gevent", "python3-docopt", "python3-prometheus-client",
                    "python3-yaml", "python3-bcrypt", "systemtap")
BUILD_TIMEOUT = 600
APT_TIMEOUT = 300
PURGED = ("", "unknown ok not-installed")
COMPILE_TIMEOUT = 60
LOG_LINES = 40  # first scrape: stap compiles the script

pytestmark = [
    pytest.mark.package,
    pytest.mark.skipif(os.environ.get("STAP_EXPORTER_PACKAGE_TEST") != "1",
                       reason="installs and purges the Debian package; .ci/run runs it"
                       " (STAP_EXPORTER_PACKAGE_TEST=1)"),
]


def run(cmd, timeout, cwd=None, env=None):
    """Run CMD; fail with its output if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, "%s exited %d:\n%s" % (" ".join(cmd), proc.returncode,
                                                        out[-4000:])
    return out


def status():
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc.stdout.decode().strip()


def installed():
    return status() not in ("", "unknown ok not-installed", "deinstall ok config-files")


def apt_get(action, target, want):
    """apt-get ACTION -y TARGET; succeeds when our package's dpkg status is
    WANT afterwards.  (apt-get also fails when another package's maintainer
    script fails: pcp's calls systemctl, which machines without systemd lack.)"""
    proc = subprocess.run(["apt-get", action, "-y", "-q", target], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                          timeout=APT_TIMEOUT)
    if action == "purge" and status() == "install ok config-files":
        # apt-get stopped at the other package before purging our
        # configuration files: finish what it started.
        subprocess.run(["dpkg", "--purge", PACKAGE], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, timeout=APT_TIMEOUT)
    assert status() in want, "apt-get %s %s: %s is %r:\n%s" % (
        action, target, PACKAGE, status(), proc.stdout.decode("utf-8", "replace")[-4000:])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version():
    with open(os.path.join(ROOT, "stapexporter_lib", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """stap-exporter_VERSION_all.deb built from a fresh clone of this checkout's HEAD."""
    work = tmp_path_factory.mktemp("deb")
    clone = work / "src"
    head = run(["git", "-C", ROOT, "rev-parse", "HEAD"], 30).strip()
    run(["git", "clone", "-q", ROOT, str(clone)], 120)
    run(["git", "-C", str(clone), "checkout", "-q", head], 30)
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], BUILD_TIMEOUT, cwd=str(clone))
    path = work / ("%s_%s_all.deb" % (PACKAGE, version()))
    assert path.exists(), "no %s; built: %s" % (path.name, sorted(os.listdir(str(work))))
    return str(path)


def test_lintian_reports_no_errors(deb):
    run(["lintian", "--fail-on", "error", deb], 300)


def test_control_fields(deb):
    control = run(["dpkg-deb", "-f", deb], 30)
    assert re.search(r"^Architecture: all$", control, re.M), control
    depends = re.search(r"^Depends: (.*)$", control, re.M).group(1)
    names = {d.strip().split()[0] for d in depends.split(",")}
    missing = [d for d in REQUIRED_DEPENDS if d not in names]
    assert not missing, "Depends lacks %s: %s" % (missing, depends)


def test_contents_install_no_script(deb):
    """The default scripts directory ships empty; examples are documentation."""
    listing = run(["dpkg-deb", "-c", deb], 30)
    paths = [line.split()[5].lstrip(".") for line in listing.splitlines()]
    assert "/etc/stap-exporter/" in paths
    assert not [p for p in paths if p.startswith("/etc/stap-exporter/") and p.endswith(".stp")]
    assert EXAMPLES + "/bpf/" + EXAMPLE in paths
    for path in ("/usr/bin/stap-exporter", "/usr/share/man/man8/stap-exporter.8.gz",
                 DEFAULTS, INIT):
        assert path in paths, "%s not in the package" % path
    assert [p for p in paths if re.fullmatch(r"(/usr)?/lib/systemd/system/stap-exporter"
                                             r"\.service", p)], "no systemd unit"


@pytest.fixture(scope="module")
def installed_deb(deb):
    assert not installed(), "%s is already installed here: not touching it" % PACKAGE
    assert not os.path.exists(SCRIPTS_DIR), "%s exists already" % SCRIPTS_DIR
    try:
        apt_get("install", deb, ("install ok installed",))
        yield deb
    finally:
        if installed():
            apt_get("purge", PACKAGE, PURGED)
        shutil.rmtree(SCRIPTS_DIR, ignore_errors=True)


def test_install_run_scrape_stop_purge(installed_deb, tmp_path):
    reason = realstap.skip_reason()
    if reason:  # asked for explicitly (CI): a skip would hide the check
        pytest.fail("the real SystemTap runtime is needed: %s" % reason)
    with open("/usr/bin/stap-exporter", "rb") as f:
        assert f.readline() == b"#!/usr/bin/python3\n", "not run by Debian's Python"
    assert os.listdir(SCRIPTS_DIR) == [], "the package put scripts in %s" % SCRIPTS_DIR
    wrapper = realstap.prepare(tmp_path / "rs").stap
    # What an administrator does: enable one example, set the options.
    shutil.copy(os.path.join(EXAMPLES, "bpf", EXAMPLE), SCRIPTS_DIR)
    port = free_port()
    with open(DEFAULTS, "a") as f:
        f.write('OPTIONS="-p %d --listen 127.0.0.1 --stap %s"\n' % (port, wrapper))
    try:
        run(["sh", INIT, "start"], 60)
        pid = int(open(PIDFILE).read())
        body = _scrape_until_metrics(port)
        assert re.search(r"^timer_ticks_total\{cpu=\"\d+\"\} \d+$", body, re.M), body
    finally:
        run(["sh", INIT, "stop"], 60)
    assert not processes_matching("stapexp_%d_" % pid), "scripts outlived the exporter"
    log = _log_tail()
    assert "event=stopped" in log and "Traceback" not in log and "Warning" not in log, log
    apt_get("purge", PACKAGE, PURGED)
    left = [p for p in ("/usr/bin/stap-exporter", DEFAULTS, INIT, LOGFILE, PIDFILE,
                        "/var/cache/stap-exporter") + tuple(glob.glob("/lib/systemd/system/"
                                                                      "stap-exporter*"))
            if os.path.lexists(p)]
    assert not left, "purge left %s" % left
    # Only what the administrator added stays.
    assert os.listdir(SCRIPTS_DIR) == [EXAMPLE]


def _scrape_until_metrics(port):
    import http.client

    def attempt():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/" + EXAMPLE)
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
        except OSError:
            return None  # not listening yet
        finally:
            conn.close()
        if resp.status == 502:
            raise AssertionError("the script failed:\n" + body + "\nlog:\n" + _log_tail())
        return body if resp.status == 200 else None
    return wait_for(attempt, timeout=COMPILE_TIMEOUT, interval=0.2,
                    message="%s to serve metrics (log: %s)" % (EXAMPLE, LOGFILE))


def _log_tail():
    try:
        with open(LOGFILE, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-LOG_LINES:])
    except OSError as exc:
        return str(exc)

