"""Checks of the service files in dist/: the systemd unit, the options file and
the SysV init script."""

import os
import re
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(REPO, "dist")
UNIT = os.path.join(DIST, "stap-exporter.service")
SYSCONFIG = os.path.join(DIST, "stap-exporter.sysconfig")
INIT = os.path.join(DIST, "stap-exporter.init")

# Hardening directives that break systemtap (kernel modules, BPF, /proc/kallsyms,
# /proc/systemtap, /sys, root privileges).
FORBIDDEN = {
    "ProtectKernelModules": "stap's kernel runtime loads kernel modules",
    "ProtectKernelTunables": "makes /proc/sys and /sys read-only",
    "ProtectKernelLogs": "not needed and hides kernel messages from stap",
    "ProcSubset": "ProcSubset=pid hides /proc/kallsyms and /proc/systemtap",
    "ProtectProc": "hides other processes that scripts may target",
    "PrivateUsers": "drops the capabilities systemtap needs",
    "PrivateDevices": "drops CAP_SYS_RAWIO and hides devices",
    "SystemCallFilter": "would have to allow bpf/init_module/perf_event_open",
    "CapabilityBoundingSet": "systemtap needs full root capabilities",
    "MemoryDenyWriteExecute": "may break the tools stap runs",
    "DynamicUser": "systemtap must run as root",
    "User": "systemtap must run as root",
}


def parse_unit(path):
    """{section: [(key, value), ...]} -- a small line parser (systemd allows
    repeated keys, which configparser does not)."""
    sections, current = {}, None
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            m = re.match(r"^\[(\w+)\]$", line)
            if m:
                current = sections.setdefault(m.group(1), [])
                continue
            assert current is not None, "%s:%d: key outside a section" % (path, lineno)
            assert not line.endswith("\\"), "%s:%d: no continuation lines please" % (path, lineno)
            key, sep, value = line.partition("=")
            assert sep, "%s:%d: not key=value: %r" % (path, lineno, line)
            current.append((key.strip(), value.strip()))
    return sections


def get(section, key):
    values = [v for k, v in section if k == key]
    assert len(values) <= 1, "%s given %d times" % (key, len(values))
    return values[0] if values else None


def seconds(value):
    """systemd time span -> seconds (plain number, or NUMBERs/min)."""
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?", value):
        total += float(num) * {"ms": 0.001, "min": 60, "m": 60, "h": 3600}.get(unit, 1)
    return total


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT)


def test_unit_sections(unit):
    assert set(unit) == {"Unit", "Service", "Install"}
    assert "man:stap-exporter(8)" in get(unit["Unit"], "Documentation").split()
    assert "network.target" in get(unit["Unit"], "After").split()
    assert get(unit["Install"], "WantedBy") == "multi-user.target"


def test_unit_exec_and_options(unit):
    svc = unit["Service"]
    # Both options files, each optional ('-'): Debian's and RPM-style systems'.
    env_files = [v for k, v in svc if k == "EnvironmentFile"]
    assert sorted(env_files) == ["-/etc/default/stap-exporter",
                                 "-/etc/sysconfig/stap-exporter"], env_files
    assert get(svc, "ExecStart") == "/usr/bin/stap-exporter $OPTIONS"
    reload_cmd = get(svc, "ExecReload")
    assert reload_cmd and re.search(r"\bkill\b.*-(HUP|SIGHUP|s HUP)\b.*\$MAINPID", reload_cmd), \
        reload_cmd


def test_unit_stop_and_restart(unit):
    svc = unit["Service"]
    assert get(svc, "Restart") == "on-failure"
    stop = get(svc, "TimeoutStopSec")
    assert stop is not None and seconds(stop) > 10, \
        "TimeoutStopSec must exceed the exporter's own ~10 s shutdown grace"
    assert get(svc, "KillMode") in (None, "control-group")
    assert get(svc, "KillSignal") in (None, "SIGTERM", "TERM")


def test_unit_hardening_does_not_break_systemtap(unit):
    svc = unit["Service"]
    for key, why in FORBIDDEN.items():
        assert get(svc, key) is None, "%s must not be set: %s" % (key, why)
    protect = get(svc, "ProtectSystem")
    if protect == "strict":
        rw = " ".join(v for k, v in svc if k == "ReadWritePaths")
        assert "/var/tmp" in rw, "ProtectSystem=strict needs ReadWritePaths=/var/tmp"
    assert get(svc, "ProtectHome") in (None, "no", "read-only", "false")
    if get(svc, "ProtectHome") == "read-only":
        env = " ".join(v for k, v in svc if k == "Environment")
        assert "SYSTEMTAP_DIR=" in env, \
            "with a read-only /root, stap's cache (~/.systemtap) must be moved"


def test_sysconfig_sets_options():
    values = {}
    with open(SYSCONFIG) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = shlex.split(value)[0] if value else ""
    assert set(values) == {"OPTIONS"}
    opts = values["OPTIONS"].split()
    assert "-p" in opts or "--port" in opts
    text = open(SYSCONFIG).read()
    # It points to the complete, maintained option list rather than copying it.
    assert "stap-exporter --help" in text and "stap-exporter(8)" in text
    for opt in ("--port", "--keepalive", "--scripts", "--listen"):
        assert opt in text, "%s not mentioned in the sysconfig file" % opt


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    # /usr/bin/stap-exporter need not exist here: verify a copy that runs /bin/true
    with open(UNIT) as f:
        text = f.read()
    copy = tmp_path / "stap-exporter.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/stap-exporter ", "ExecStart=/bin/true "))
    proc = subprocess.run([tool, "verify", "--man=no", str(copy)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)
    out = proc.stdout.decode("utf-8", "replace")
    # verify exits 0 even for unknown keys and bad values; it only prints them
    complaints = [l for l in out.splitlines() if "stap-exporter.service" in l]
    assert proc.returncode == 0 and not complaints, out


def test_init_script_syntax():
    proc = subprocess.run(["sh", "-n", INIT], stderr=subprocess.PIPE, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    assert os.access(INIT, os.X_OK)
    text = open(INIT).read()
    assert "### BEGIN INIT INFO" in text and "### END INIT INFO" in text
    for action in ("start)", "stop)", "restart)", "reload)", "status)"):
        assert action in text
    assert "/etc/sysconfig/" in text and "/etc/default/" in text


def test_init_script_lifecycle(tmp_path):
    """start/status/reload/stop with a stand-in daemon, through the real script."""
    log = tmp_path / "daemon.log"
    daemon = tmp_path / "fake-exporter"
    daemon.write_text("#!/bin/sh\n"
                      "echo \"args: $*\"\n"
                      "trap 'echo got HUP' HUP\n"
                      "trap 'echo got TERM; exit 0' TERM\n"
                      "while :; do sleep 0.1; done\n")
    daemon.chmod(0o755)
    env = dict(os.environ, DAEMON=str(daemon), PIDFILE=str(tmp_path / "pid"),
               LOGFILE=str(log), STOP_TIMEOUT="10")

    def run(action):
        return subprocess.run(["sh", INIT, action], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=30)

    try:
        assert run("start").returncode == 0
        pid = int((tmp_path / "pid").read_text())
        assert run("status").returncode == 0
        assert run("reload").returncode == 0
    finally:
        stop = run("stop")
    assert stop.returncode == 0, stop.stdout
    assert run("status").returncode == 3
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    text = log.read_text()
    assert "args: -p" in text and "got HUP" in text and "got TERM" in text
