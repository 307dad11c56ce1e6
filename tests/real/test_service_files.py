"""Checks of the service files in dist/: the systemd unit and socket, the
options file and the SysV init script."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT as REPO  # noqa: E402
DIST = os.path.join(REPO, "dist")
UNIT = os.path.join(DIST, "stap-exporter.service")
SOCKET = os.path.join(DIST, "stap-exporter.socket")
SYSCONFIG = os.path.join(DIST, "stap-exporter.sysconfig")
INIT = os.path.join(DIST, "stap-exporter.init")

# Hardening directives that break systemtap (kernel modules, BPF, /proc/kallsyms,
# /proc/systemtap, /sys, root privileges).
FORBIDDEN = {
    "ProtectKernelModules": "stap's kernel runtime loads kernel modules",
    "ProtectKernelTunables": "makes /proc/sys and /sys read-only",
    "ProtectKernelLogs": "drops CAP_SYSLOG (/proc/kallsyms addresses), hides /dev/kmsg",
    "ProcSubset": "ProcSubset=pid hides /proc/kallsyms and /proc/systemtap",
    "ProtectProc": "what stap needs of other processes' /proc entries is not documented",
    "PrivateUsers": "drops the capabilities systemtap needs",
    "PrivateDevices": "its /dev has no /dev/kmsg, without which stapbpf crashes when stopped",
    "ProtectClock": "its device allow-list shuts out /dev/kmsg (stapbpf, as above)",
    "SystemCallFilter": "would have to allow bpf/init_module/perf_event_open",
    "CapabilityBoundingSet": "systemtap needs full root capabilities",
    "MemoryDenyWriteExecute": "may break the tools stap runs",
    "DynamicUser": "systemtap must run as root",
    "User": "systemtap must run as root",
}
# Sandboxing that stap and its loaders work under.
REQUIRED = {
    "PrivateTmp": "yes",
    "ProtectSystem": "full",
    "NoNewPrivileges": "yes",
    "UMask": "0077",
    "RestrictNamespaces": "yes",
    "SystemCallArchitectures": "native",
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
    # Both options files, each optional ('-'), Debian's first: a variable set
    # in /etc/sysconfig/stap-exporter (systemtap's exporter's file) wins.
    env_files = [v for k, v in svc if k == "EnvironmentFile"]
    assert env_files == ["-/etc/default/stap-exporter", "-/etc/sysconfig/stap-exporter"]
    assert get(svc, "ExecStart") == "/usr/bin/stap-exporter $PORT $KEEPALIVE $SCRIPTS $OPTIONS"
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


@pytest.mark.parametrize("bad", [["--no-such-option"], ["-p", "99999"],
                                 ["-s", "/nonexistent/stap-exporter-scripts"]])
def test_unit_does_not_restart_on_bad_options(unit, bad):
    """A typo in the options is not retried every RestartSec forever: the
    status the command exits with for it stops the restarts."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "stapexporter.py")] + bad,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode != 0 and proc.stderr.decode().count("\n") == 1, proc.stderr
    prevent = (get(unit["Service"], "RestartPreventExitStatus") or "").split()
    assert str(proc.returncode) in prevent, (proc.returncode, prevent)


def test_unit_hardening_does_not_break_systemtap(unit):
    svc = unit["Service"]
    for key, why in FORBIDDEN.items():
        assert get(svc, key) is None, "%s must not be set: %s" % (key, why)
    for key, value in REQUIRED.items():
        assert get(svc, key) == value, key
    # Each setting left out says why, in the unit's comments.
    with open(UNIT) as f:
        comments = "".join(line for line in f if line.startswith("#"))
    unexplained = [key for key in FORBIDDEN if not re.search(r"\b%s\b" % key, comments)]
    assert not unexplained, "left out without a reason in the unit: %s" % unexplained
    protect = get(svc, "ProtectSystem")
    if protect == "strict":
        rw = " ".join(v for k, v in svc if k == "ReadWritePaths")
        assert "/var/tmp" in rw, "ProtectSystem=strict needs ReadWritePaths=/var/tmp"
    assert get(svc, "ProtectHome") in (None, "no", "read-only", "false")
    if get(svc, "ProtectHome") == "read-only":
        env = " ".join(v for k, v in svc if k == "Environment")
        assert "SYSTEMTAP_DIR=" in env, \
            "with a read-only /root, stap's cache (~/.systemtap) must be moved"


def sourced(path, names):
    """{name: value} for NAMES after the shell sources PATH."""
    script = r'. "$1"; shift; for name; do eval "value=\$$name"; printf "%s\n" "$value"; done'
    proc = subprocess.run(["sh", "-c", script, "sh", path] + names, stdout=subprocess.PIPE,
                          timeout=30, check=True, env={"PATH": os.environ["PATH"]})
    return dict(zip(names, proc.stdout.decode().splitlines()))


def test_sysconfig_sets_options():
    """The four variables of systemtap's exporter's options file, each holding
    whole options."""
    with open(SYSCONFIG) as f:
        text = f.read()
    keys = {line.partition("=")[0] for line in text.splitlines()
            if line.strip() and not line.startswith("#")}
    assert keys == {"PORT", "KEEPALIVE", "SCRIPTS", "OPTIONS"}
    values = sourced(SYSCONFIG, sorted(keys))
    assert values == {"PORT": "-p 9900", "KEEPALIVE": "-k 300", "SCRIPTS": "", "OPTIONS": ""}
    # Both ways of writing the options are shown.
    assert re.search(r'^#\s+PORT= KEEPALIVE= OPTIONS="-p 9900 -k 300"$', text, re.M)
    # It points to the complete, maintained option list rather than copying it.
    assert "stap-exporter --help" in text and "stap-exporter(8)" in text
    for opt in ("--port", "--keepalive", "--scripts", "--listen"):
        assert opt in text, "%s not mentioned in the sysconfig file" % opt


def test_socket_unit_holds_the_default_port():
    sock = parse_unit(SOCKET)
    assert set(sock) == {"Unit", "Socket", "Install"}
    assert "man:stap-exporter(8)" in get(sock["Unit"], "Documentation").split()
    # One listening socket handed to one exporter, not one exporter per connection.
    assert get(sock["Socket"], "Accept") in (None, "no", "false")
    # The port the exporter binds itself without the socket.
    with open(os.path.join(REPO, "stapexporter_lib", "cli.py")) as f:
        default = re.search(r"--port PORT.*\n.*\[default: (\d+)\]", f.read()).group(1)
    assert get(sock["Socket"], "ListenStream") == default
    assert sourced(SYSCONFIG, ["PORT"])["PORT"] == "-p " + default
    assert get(sock["Install"], "WantedBy") == "sockets.target"


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    # /usr/bin/stap-exporter need not exist here: verify a copy that runs /bin/true
    with open(UNIT) as f:
        text = f.read()
    copy = tmp_path / "stap-exporter.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/stap-exporter ", "ExecStart=/bin/true "))
    shutil.copy(SOCKET, str(tmp_path))
    proc = subprocess.run([tool, "verify", "--man=no", str(copy), str(tmp_path / "stap-exporter"
                                                                     ".socket")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    out = proc.stdout.decode("utf-8", "replace")
    # verify exits 0 even for unknown keys and bad values; it only prints them
    complaints = [l for l in out.splitlines() if "stap-exporter." in l]
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


def fake_daemon(tmp_path):
    """An executable that logs its arguments and signals, and runs until SIGTERM."""
    daemon = tmp_path / "fake-exporter"
    daemon.write_text("#!/bin/sh\n"
                      "echo \"args: $*\"\n"
                      "trap 'echo got HUP' HUP\n"
                      "trap 'echo got TERM; exit 0' TERM\n"
                      "while :; do sleep 0.1; done\n")
    daemon.chmod(0o755)
    return daemon


def init_script(tmp_path, **env):
    """A runner of the real init script's actions for a fake daemon, its
    files in TMP_PATH."""
    env = dict(os.environ, DAEMON=str(fake_daemon(tmp_path)), PIDFILE=str(tmp_path / "pid"),
               LOGFILE=str(tmp_path / "daemon.log"), STOP_TIMEOUT="10", **env)

    def run(action):
        return subprocess.run(["sh", INIT, action], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=30)
    return run


def test_init_script_lifecycle(tmp_path):
    """start/status/reload/stop through the real script, with the options of
    the shipped file and of one written for systemtap's exporter (it wins)."""
    systemtap = tmp_path / "sysconfig"
    systemtap.write_text('PORT="-p 9901"\nKEEPALIVE="-k 60"\nSCRIPTS="-s /srv/stap scripts"\n'
                         'OPTIONS="--listen 127.0.0.1 --log-level debug"\n')
    run = init_script(tmp_path, CONFIG_FILES="%s %s" % (SYSCONFIG, systemtap))
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
    text = (tmp_path / "daemon.log").read_text()
    # Split as a shell splits words: the unquoted space separates.
    assert "args: -p 9901 -k 60 -s /srv/stap scripts --listen 127.0.0.1 --log-level debug\n" \
        in text
    assert "got HUP" in text and "got TERM" in text


def test_init_script_takes_no_options_from_the_environment(tmp_path):
    run = init_script(tmp_path, CONFIG_FILES=str(tmp_path / "none"), PORT="-p 1",
                      KEEPALIVE="-k 1", SCRIPTS="-s /tmp", OPTIONS="--insecure-scripts")
    try:
        assert run("start").returncode == 0
    finally:
        assert run("stop").returncode == 0
    assert "args: \n" in (tmp_path / "daemon.log").read_text()
