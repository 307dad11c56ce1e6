"""The packages, end to end, as an administrator would meet them.

The Debian package is built with Debian's tooling from a fresh clone (and once
more as a higher version, to upgrade to), checked by lintian, installed with
apt-get, run through its init script with the real SystemTap runtime, fed a
sysconfig file written for systemtap's own exporter, upgraded, removed and
purged; its systemd maintainer scripts are run against a stand-in systemctl.
The wheel is built with Debian's pip, the RPM with Debian's rpmbuild and
checked by rpmlint.

It changes the system (installs and purges the package, lifts the image's
policy-rc.d for its duration), so it runs only when asked: ``.ci/run`` sets
STAP_EXPORTER_PACKAGE_TEST=1 after ``tools/install-deps --package``.
"""

import datetime
import email.utils
import glob
import http.client
import os
import re
import shutil
import socket
import subprocess
import zipfile

import pytest

from conftest import ROOT, pid_alive, processes_matching, wait_for
import realstap

PACKAGE = "stap-exporter"
SCRIPTS_DIR = "/etc/stap-exporter"
DEFAULTS = "/etc/default/stap-exporter"
SYSCONFIG = "/etc/sysconfig/stap-exporter"
INIT = "/etc/init.d/stap-exporter"
PRIVATE = "/usr/share/stap-exporter"
RULES = PRIVATE + "/stap-exporter.rules.yml"  # Prometheus rules for the self-metrics
EXAMPLES = "/usr/share/doc/stap-exporter/examples"
PIDFILE = "/run/stap-exporter.pid"
LOGFILE = "/var/log/stap-exporter.log"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
UNITS = ("stap-exporter.service", "stap-exporter.socket")
EXAMPLE = "timer-ticks.stp"  # BPF-capable: runs with the quick start's runtime
REQUIRED_DEPENDS = ("python3-gevent", "python3-docopt", "python3-prometheus-client",
                    "python3-yaml", "python3-bcrypt", "systemtap")
FEDORA_REQUIRES = ("python3-gevent", "python3-docopt", "python3-prometheus_client",
                   "python3-pyyaml", "python3-bcrypt", "systemtap-runtime")
UPGRADE_SUFFIX = "+upgrade1"
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


def installed_version():
    return run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], 30)


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
    out = proc.stdout.decode("utf-8", "replace")
    assert status() in want, "apt-get %s %s: %s is %r:\n%s" % (
        action, target, PACKAGE, status(), out[-4000:])
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version():
    with open(os.path.join(ROOT, "stapexporter_lib", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def exporter_pids():
    """The installed exporter's processes (the test suite's own exporters run
    stapexporter.py from the checkout)."""
    return processes_matching("/usr/bin/stap-exporter")


def modules_in(tree):
    """The .py files of stapexporter_lib under TREE, relative to TREE."""
    return sorted(os.path.relpath(p, tree) for p in
                  glob.glob(os.path.join(tree, "stapexporter_lib", "**", "*.py"), recursive=True))


# --- Builds --------------------------------------------------------------------------------


class Builds:
    """The .deb of this checkout's HEAD (built in SRC), the .deb of the same
    code as a higher version (UPGRADE), and the directory they were built in."""

    def __init__(self, src, current, upgrade):
        self.src, self.current, self.upgrade = src, current, upgrade


def clone(dest):
    head = run(["git", "-C", ROOT, "rev-parse", "HEAD"], 30).strip()
    run(["git", "clone", "-q", ROOT, str(dest)], 120)
    run(["git", "-C", str(dest), "checkout", "-q", head], 30)


def bump_version(src, new):
    """Make the checkout SRC version NEW: the Python package's __version__
    (so a running exporter says which code it runs) and a changelog entry."""
    init = src / "stapexporter_lib" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "%s"' % new,
                           init.read_text()))
    changelog = src / "debian" / "changelog"
    old = changelog.read_text()
    maintainer = re.search(r"^ -- (.+?>)  ", old, re.M).group(1)
    date = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc))
    changelog.write_text("%s (%s) unstable; urgency=medium\n\n  * Rebuilt by the package"
                         " test, to upgrade to.\n\n -- %s  %s\n\n%s"
                         % (PACKAGE, new, maintainer, date, old))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Both .debs, built at the same time, each from a fresh clone of HEAD."""
    work = tmp_path_factory.mktemp("deb")
    versions = {"current": version(), "upgrade": version() + UPGRADE_SUFFIX}
    procs = {}
    for name in versions:
        src = work / name / "src"
        clone(src)
        if name == "upgrade":
            bump_version(src, versions[name])
        log = open(str(work / name / "build.log"), "wb")
        procs[name] = (subprocess.Popen(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=str(src),
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT), log)
    debs = {}
    for name, (proc, log) in procs.items():
        rc = proc.wait(timeout=BUILD_TIMEOUT)
        log.close()
        with open(log.name, encoding="utf-8", errors="replace") as f:
            assert rc == 0, "dpkg-buildpackage (%s) exited %d:\n%s" % (name, rc, f.read()[-4000:])
        path = work / name / ("%s_%s_all.deb" % (PACKAGE, versions[name]))
        assert path.exists(), "no %s; built: %s" % (path.name, os.listdir(str(work / name)))
        debs[name] = str(path)
    return Builds(work / "current" / "src", debs["current"], debs["upgrade"])


@pytest.fixture(scope="module")
def unpacked(builds, tmp_path_factory):
    """The current .deb's files, unpacked."""
    tree = tmp_path_factory.mktemp("unpacked")
    run(["dpkg-deb", "-x", builds.current, str(tree)], 60)
    return tree


def test_lintian_pedantic_reports_no_error_or_warning(builds):
    out = run(["lintian", "--pedantic", "--fail-on", "error,warning", "--tag-display-limit", "0",
               builds.current], 300)
    assert not re.search(r"^[EW]: ", out, re.M), out


def test_control_fields(builds):
    control = run(["dpkg-deb", "-f", builds.current], 30)
    assert re.search(r"^Architecture: all$", control, re.M), control
    depends = re.search(r"^Depends: (.*)$", control, re.M).group(1)
    names = {d.strip().split()[0] for d in depends.split(",")}
    missing = [d for d in REQUIRED_DEPENDS if d not in names]
    assert not missing, "Depends lacks %s: %s" % (missing, depends)
    # debhelper's own pre-dependency (init-system-helpers, for the service
    # scripts) comes through ${misc:Pre-Depends}.
    assert re.search(r"^Pre-Depends: .*init-system-helpers", control, re.M), control


def test_contents(builds, unpacked):
    """The default scripts directory ships empty; examples are documentation;
    the modules are private, the whole stapexporter_lib tree."""
    listing = run(["dpkg-deb", "-c", builds.current], 30)
    paths = [line.split()[5].lstrip(".") for line in listing.splitlines()]
    assert "/etc/stap-exporter/" in paths
    assert not [p for p in paths if p.startswith("/etc/stap-exporter/") and p.endswith(".stp")]
    assert EXAMPLES + "/bpf/" + EXAMPLE in paths
    for path in ("/usr/share/man/man8/stap-exporter.8.gz", DEFAULTS, INIT,
                 "/etc/logrotate.d/stap-exporter", "/usr/share/doc/stap-exporter/README.md.gz",
                 PRIVATE + "/stap-exporter", PRIVATE + "/stapexporter.py", RULES):
        assert path in paths, "%s not in the package" % path
    for unit in UNITS:
        assert "/lib/systemd/system/" + unit in paths, "no %s" % unit
    assert os.readlink(str(unpacked / "usr/bin/stap-exporter")) == \
        "../share/stap-exporter/stap-exporter"
    assert modules_in(str(builds.src)) == modules_in(str(unpacked) + PRIVATE)
    public = [p for p in paths if "-packages/" in p or re.search(r"\.(egg|dist)-info", p)]
    assert not public, "public modules or their metadata: %s" % public
    assert not [p for p in paths if p.startswith(PRIVATE + "/dist")], "setup.py's service files"


def test_no_script_line_on_files_that_are_not_executable(unpacked):
    offenders = []
    for dirpath, _, files in os.walk(str(unpacked)):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or os.access(path, os.X_OK):
                continue
            with open(path, "rb") as f:
                if f.read(2) == b"#!":
                    offenders.append(os.path.relpath(path, str(unpacked)))
    assert not offenders


# --- Service actions -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service_actions_allowed():
    """This image's policy-rc.d refuses every service action (exit 101), as
    container images do; a real host has none.  Lift it while the package is
    tried, and put it back afterwards."""
    if not os.path.lexists(POLICY_RC_D):
        yield
        return
    aside = POLICY_RC_D + ".lifted-by-stap-exporter-test"
    os.rename(POLICY_RC_D, aside)
    try:
        yield
    finally:
        os.rename(aside, POLICY_RC_D)


FAKE_SYSTEMCTL = """#!/bin/sh
# A stand-in systemctl: units named in $FAKE_ACTIVE are active, none is
# enabled; every call is logged to $FAKE_LOG.
echo "$*" >> "$FAKE_LOG"
unit=""
for arg in "$@"; do unit=$arg; done
case " $* " in
    *" is-enabled "*) echo disabled; exit 1 ;;
    *" is-active "*) case " $FAKE_ACTIVE " in *" $unit "*) exit 0 ;; *) exit 3 ;; esac ;;
    *" SourcePath "*) echo "/lib/systemd/system/$unit" ;;
esac
exit 0
"""


def run_maintainer_script(script, args, active, fakes, log):
    """Run the package's maintainer SCRIPT with ARGS as on a systemd host: in
    a mount namespace with /run/systemd/system, the real deb-systemd-invoke
    and invoke-rc.d, and stand-ins for systemctl (units in ACTIVE running)
    and the helpers that would change this host's state.  Returns the service
    actions systemctl was asked for."""
    open(log, "w").close()
    env = dict(os.environ, PATH=fakes + ":/usr/sbin:/usr/bin:/sbin:/bin", FAKE_LOG=log,
               FAKE_ACTIVE=" ".join(active))
    run(["unshare", "--mount", "sh", "-c",
         'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec sh "$@"',
         "sh", script] + list(args), 60, env=env)
    with open(log) as f:
        calls = f.read().splitlines()
    queries = ("is-enabled", "is-active", "show", "daemon-reload")
    return [c for c in calls if not any(q in c.split() for q in queries)]


def test_systemd_maintainer_scripts(builds, service_actions_allowed, tmp_path):
    """Fresh install: nothing started.  Upgrade: a running unit restarted,
    though disabled.  Removal: both units stopped.  Upgrade's prerm: nothing."""
    scripts = tmp_path / "control"
    run(["dpkg-deb", "-e", builds.current, str(scripts)], 30)
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "systemctl").write_text(FAKE_SYSTEMCTL)
    # Helpers whose real versions would change this host: they do nothing.
    for helper in ("deb-systemd-helper", "update-rc.d", "py3compile", "py3clean"):
        (fakes / helper).write_text("#!/bin/sh\nexit 0\n")
    for f in fakes.iterdir():
        f.chmod(0o755)
    log = str(tmp_path / "systemctl.log")

    def actions(script, *args, active=()):
        return run_maintainer_script(str(scripts / script), args, active, str(fakes), log)

    assert actions("postinst", "configure", "") == []
    assert actions("postinst", "configure", "1.0.0",
                   active=["stap-exporter.service"]) == \
        ["--quiet --system restart stap-exporter.service"]
    assert actions("postinst", "configure", "1.0.0") == []
    assert actions("prerm", "upgrade", "9.9") == []
    assert actions("prerm", "remove", active=["stap-exporter.service"]) == \
        ["stop stap-exporter.service stap-exporter.socket"]


# --- The installed package -------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_deb(builds, service_actions_allowed):
    assert not installed(), "%s is already installed here: not touching it" % PACKAGE
    assert not os.path.exists(SCRIPTS_DIR), "%s exists already" % SCRIPTS_DIR
    assert not os.path.exists(SYSCONFIG), "%s exists already" % SYSCONFIG
    assert not exporter_pids(), "an exporter of an installed package runs here already"
    made_sysconfig_dir = not os.path.isdir(os.path.dirname(SYSCONFIG))
    try:
        apt_get("install", builds.current, ("install ok installed",))
        yield builds
    finally:
        if installed():
            apt_get("purge", PACKAGE, PURGED)
        shutil.rmtree(SCRIPTS_DIR, ignore_errors=True)
        if os.path.exists(SYSCONFIG):
            os.unlink(SYSCONFIG)
        if made_sysconfig_dir and os.path.isdir(os.path.dirname(SYSCONFIG)):
            os.rmdir(os.path.dirname(SYSCONFIG))


@pytest.fixture(scope="module")
def stap_wrapper(tmp_path_factory):
    reason = realstap.skip_reason()
    if reason:  # asked for explicitly (CI): a skip would hide the check
        pytest.fail("the real SystemTap runtime is needed: %s" % reason)
    return realstap.prepare(tmp_path_factory.mktemp("rs")).stap


def test_fresh_install_leaves_the_service_disabled_and_stopped(installed_deb):
    assert not exporter_pids() and not os.path.exists(PIDFILE)
    assert glob.glob("/etc/rc2.d/K*stap-exporter"), "no init script links"
    assert not glob.glob("/etc/rc[S2345].d/S*stap-exporter"), "the init script is enabled"
    assert os.listdir(SCRIPTS_DIR) == [], "the package put scripts in %s" % SCRIPTS_DIR
    with open("/usr/bin/stap-exporter", "rb") as f:
        assert f.readline() == b"#!/usr/bin/python3\n", "not run by Debian's Python"
    assert run(["/usr/bin/stap-exporter", "--version"], 30).strip() == \
        "stap-exporter %s" % version()


def test_autopkgtest(installed_deb, tmp_path):
    """debian/tests/smoke, run as autopkgtest runs it: from the source tree,
    with AUTOPKGTEST_TMP."""
    with open(str(installed_deb.src / "debian" / "tests" / "control")) as f:
        assert re.search(r"^Tests: smoke$", f.read(), re.M)
    out = run([str(installed_deb.src / "debian" / "tests" / "smoke")], 120,
              cwd=str(installed_deb.src), env=dict(os.environ, AUTOPKGTEST_TMP=str(tmp_path)))
    assert "smoke: the installed exporter served" in out, out


def test_sysconfig_of_systemtaps_exporter(installed_deb, stap_wrapper, tmp_path):
    """What an administrator coming from systemtap's own exporter does: put its
    /etc/sysconfig/stap-exporter in place and start the service.  Its PORT,
    KEEPALIVE and SCRIPTS hold; the package's /etc/default file does not
    override them."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(os.path.join(EXAMPLES, "bpf", EXAMPLE), str(scripts))
    port = free_port()
    os.makedirs(os.path.dirname(SYSCONFIG), exist_ok=True)
    with open(SYSCONFIG, "w") as f:
        f.write('# systemtap stap-exporter options\nPORT="-p %d"\nKEEPALIVE="-k 300"\n'
                'SCRIPTS="-s %s"\nOPTIONS="--listen 127.0.0.1 --stap %s"\n'
                % (port, scripts, stap_wrapper))
    try:
        run(["sh", INIT, "start"], 60)
        pid = int(open(PIDFILE).read())
        body = _scrape_until_metrics(port)
        assert re.search(r"^timer_ticks_total\{cpu=\"\d+\"\} \d+$", body, re.M), body
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().decode().split("\0")[:-1]
        assert argv[1:] == ["/usr/bin/stap-exporter", "-p", str(port), "-k", "300",
                            "-s", str(scripts), "--listen", "127.0.0.1", "--stap", stap_wrapper]
    finally:
        run(["sh", INIT, "stop"], 60)
        os.unlink(SYSCONFIG)
    assert not processes_matching("stapexp_%d_" % pid), "scripts outlived the exporter"


def test_start_rotate_upgrade_remove_purge(installed_deb, stap_wrapper):
    # What an administrator does: enable one example, set the options, start.
    shutil.copy(os.path.join(EXAMPLES, "bpf", EXAMPLE), SCRIPTS_DIR)
    port = free_port()
    with open(DEFAULTS, "a") as f:
        f.write('PORT="-p %d"\nOPTIONS="--listen 127.0.0.1 --stap %s"\n' % (port, stap_wrapper))
    run(["sh", INIT, "start"], 60)
    old = int(open(PIDFILE).read())
    body = _scrape_until_metrics(port)
    assert re.search(r"^timer_ticks_total\{cpu=\"\d+\"\} \d+$", body, re.M), body
    assert _running_version(port) == version()

    # logrotate: the log is rotated, and the exporter goes on writing to it.
    run(["logrotate", "-f", "-s", "/run/stap-exporter-test.logrotate-state",
         "/etc/logrotate.d/stap-exporter"], 60)
    assert os.path.exists(LOGFILE + ".1")
    run(["sh", INIT, "reload"], 30)
    wait_for(lambda: "SIGHUP received" in _log_tail(), timeout=10,
             message="the exporter's next log line in the rotated %s" % LOGFILE)
    os.unlink("/run/stap-exporter-test.logrotate-state")

    # Upgrade: the running exporter is replaced by one running the new code.
    apt_get("install", installed_deb.upgrade, ("install ok installed",))
    assert installed_version() == version() + UPGRADE_SUFFIX
    new = int(open(PIDFILE).read())
    assert new != old and not pid_alive(old), "the old exporter still runs"
    assert not processes_matching("stapexp_%d_" % old), "the old exporter's scripts run on"
    wait_for(lambda: _running_version(port) == version() + UPGRADE_SUFFIX, timeout=30,
             message="the exporter to run the upgraded code")
    _scrape_until_metrics(port)

    # Removal stops the exporter and its scripts.
    apt_get("remove", PACKAGE, ("deinstall ok config-files",))
    assert not exporter_pids(), "an exporter runs on after removal"
    assert not processes_matching("stapexp_%d_" % new), "scripts outlived the exporter"
    log = _log_tail()
    assert "event=stopped" in log and "Traceback" not in log and "Warning" not in log, log

    apt_get("purge", PACKAGE, PURGED)
    assert not exporter_pids()
    left = [p for p in ("/usr/bin/stap-exporter", PRIVATE, DEFAULTS, INIT, LOGFILE,
                        LOGFILE + ".1", PIDFILE, "/etc/logrotate.d/stap-exporter",
                        "/var/cache/stap-exporter") + tuple(glob.glob("/lib/systemd/system/"
                                                                      "stap-exporter*"))
            + tuple(glob.glob("/etc/rc?.d/*stap-exporter"))
            if os.path.lexists(p)]
    assert not left, "purge left %s" % left
    # Only what the administrator added stays.
    assert os.listdir(SCRIPTS_DIR) == [EXAMPLE]


def _running_version(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    except OSError:
        return None  # restarting
    finally:
        conn.close()
    match = re.search(r'^stap_exporter_build_info\{version="([^"]+)"\}', body, re.M)
    return match and match.group(1)


def _scrape_until_metrics(port):
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


# --- The wheel and the RPM -------------------------------------------------------------------


def test_wheel_with_debians_pip(builds, tmp_path):
    """`pip wheel .` with Debian 12's own pip (PEP 517: no setup.py install)."""
    out = run(["/usr/bin/python3", "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path),
               str(builds.src)], 300)
    wheels = glob.glob(str(tmp_path / "*.whl"))
    assert len(wheels) == 1, out
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        info = "stap_exporter-%s.dist-info/" % version()
        metadata = whl.read(info + "METADATA").decode()
        entry_points = whl.read(info + "entry_points.txt").decode()
        # A wheel's modules are installed not executable: no #! line.
        scripted = [n for n in names if n.endswith(".py") and whl.read(n).startswith(b"#!")]
    assert not scripted
    assert modules_in(str(builds.src)) == sorted(n for n in names
                                                 if re.match(r"stapexporter_lib/.*\.py$", n))
    assert "stapexporter.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert re.search(r"^License(-Expression)?: GPL-2\.0-or-later$", metadata, re.M), metadata
    assert "stap-exporter = stapexporter:main" in entry_points
    data = "stap_exporter-%s.data/data/share/" % version()
    for path in ("man/man8/stap-exporter.8", "doc/stap-exporter/examples/bpf/" + EXAMPLE,
                 "stap-exporter/dist/stap-exporter.socket"):
        assert data + path in names


@pytest.fixture(scope="module")
def rpm(builds, tmp_path_factory):
    """The RPM built by Debian's rpmbuild from a tarball of the clone."""
    top = tmp_path_factory.mktemp("rpm")
    name = "%s-%s" % (PACKAGE, version())
    run(["git", "-C", str(builds.src), "archive", "--prefix=%s/" % name,
         "-o", str(top / (name + ".tar.gz")), "HEAD"], 60)
    # --nodeps: Debian has no RPM database of the build dependencies.
    run(["rpmbuild", "-bb", "--nodeps", "--define", "_topdir %s" % top,
         "--define", "_sourcedir %s" % top, str(builds.src / "rpm" / "stap-exporter.spec")],
        BUILD_TIMEOUT)
    rpms = glob.glob(str(top / "RPMS" / "noarch" / "*.rpm"))
    assert len(rpms) == 1, rpms
    return rpms[0]


def test_rpmlint(builds, rpm):
    spec = str(builds.src / "rpm" / "stap-exporter.spec")
    out = run(["rpmlint", "-r", str(builds.src / "rpm" / "stap-exporter.rpmlintrc"), rpm, spec],
              120)
    assert " 0 errors" in out, out


def test_rpm_contents_and_scriptlets(builds, rpm, tmp_path):
    def query(*fmt):
        return run(["rpm", "-qp"] + list(fmt) + [rpm], 60)

    assert query("--conflicts").split() == ["systemtap-exporter"]
    requires = {line.split()[0] for line in query("--requires").splitlines()}
    assert set(FEDORA_REQUIRES) <= requires, requires
    flags = dict(line.split(" ", 1) for line in
                 query("--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]").splitlines())
    assert flags["/etc/sysconfig/stap-exporter"] == "cn", "not %config(noreplace)"
    for unit in UNITS:
        assert "/usr/lib/systemd/system/" + unit in flags
    assert RULES in flags
    scripts = query("--scripts")
    assert re.search(r"preuninstall.*\n.*\$1 -eq 0.*disable --now stap-exporter.service "
                     r"stap-exporter.socket", scripts), scripts
    assert re.search(r"postuninstall.*\n.*\$1 -ge 1.*try-restart stap-exporter.service",
                     scripts), scripts
    # The private layout works from the RPM's files too.
    root = tmp_path / "root"
    root.mkdir()
    with open(rpm, "rb") as package:
        cpio = subprocess.run(["rpm2cpio", "-"], stdin=package, stdout=subprocess.PIPE,
                              check=True, timeout=60).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=str(root), check=True,
                   timeout=60)
    assert modules_in(str(builds.src)) == modules_in(str(root) + PRIVATE)
    assert os.readlink(str(root / "usr/bin/stap-exporter")) == \
        "../share/stap-exporter/stap-exporter"
    out = run(["/usr/bin/python3", str(root / "usr/bin/stap-exporter"), "--version"], 30)
    assert out.strip() == "stap-exporter %s" % version()
