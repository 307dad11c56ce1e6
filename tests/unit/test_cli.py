"""The command line, run as a user would: errors are one line, no traceback."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import EXPORTER, ROOT

sys.path.insert(0, ROOT)
from stapexporter_lib import cli  # noqa: E402


def run(*args, timeout=20):
    return subprocess.run([sys.executable, EXPORTER] + list(args), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, cwd=ROOT)


def assert_one_line_error(proc, *fragments):
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stap-exporter: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_help_lists_every_option():
    proc = run("--help")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    for option in ("-p --port PORT", "-k --keepalive KEEPALIVE", "-s --scripts SCRIPTS",
                   "-c SCRIPTS", "--listen ADDR", "--stap CMD", "--procfs-dirs DIRS",
                   "--log-level LEVEL", "--stop-timeout SECONDS", "--check", "-h --help",
                   "--version", "[default: 9900]"):
        assert option in out, option


def test_version():
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode().startswith("stap-exporter ")


@pytest.mark.parametrize("args,fragments", [
    (["-p", "abc"], ["--port", "'abc'", "not a number"]),
    (["-p", "70000"], ["--port", "70000", "out of range"]),
    (["-p", "-1"], ["--port", "out of range"]),
    (["-k", "-5"], ["--keepalive", "positive"]),
    (["-k", "soon"], ["--keepalive", "not a number"]),
    (["-k", "nan"], ["--keepalive", "positive"]),
    (["--log-level", "loud"], ["--log-level", "loud"]),
    (["--stap", ""], ["--stap", "empty"]),
    (["--stop-timeout", "0"], ["--stop-timeout", "positive"]),
    (["--no-such-option"], ["invalid arguments", "--help"]),
    (["--max-series", "0"], ["--max-series", "at least 1"]),
    (["--max-series", "many"], ["--max-series", "'many'", "not a whole number"]),
])
def test_bad_values(tmp_path, args, fragments):
    assert_one_line_error(run("-s", str(tmp_path), *args), *fragments)


def test_missing_scripts_directory(tmp_path):
    assert_one_line_error(run("-s", str(tmp_path / "nope")), "--scripts", "does not exist")


def test_scripts_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(run("-s", str(f)), "not a directory")


def test_unreadable_scripts_directory(tmp_path, monkeypatch):
    # Root reads every directory, so make access() say what it would say to
    # an unprivileged user.
    d = tmp_path / "locked"
    d.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access",
                        lambda p, mode: False if str(p) == str(d) else real_access(p, mode))
    with pytest.raises(cli.UsageError, match="not readable"):
        cli.parse(["-s", str(d)])


def test_port_in_use(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        proc = run("-s", str(tmp_path), "--listen", "127.0.0.1", "-p", str(port))
        assert_one_line_error(proc, "127.0.0.1:%d" % port, "in use")
    finally:
        busy.close()


@pytest.mark.parametrize("addr,fragment", [
    ("192.0.2.1", "192.0.2.1"),        # TEST-NET: not an address of this host
    ("not-an-address", "not-an-address"),
    ("a..b", "a..b"),                  # an empty label
    ("\u00e4..b", "not a valid host name"),  # the same, not ASCII (the idna codec's refusal)
])
def test_address_not_bindable(tmp_path, addr, fragment):
    assert_one_line_error(run("-s", str(tmp_path), "--listen", addr, "-p", "0"),
                          "cannot listen", fragment)


def test_c_is_an_alias_of_scripts(tmp_path):
    config = cli.parse(["-c", str(tmp_path)])
    assert config.scripts_dir == str(tmp_path)


def test_defaults(tmp_path):
    config = cli.parse(["-s", str(tmp_path)])
    assert config.port == 9900
    assert config.keepalive is None
    assert config.listen is None
    assert config.stap == ["stap"]
    assert config.procfs_dirs[0] == "/proc/systemtap"
    assert config.procfs_dirs[1].startswith("/var/tmp/systemtap-")
    assert config.max_series is None and config.bpf_stats is False


def test_stap_command_is_split_like_a_shell(tmp_path):
    config = cli.parse(["-s", str(tmp_path), "--stap", "env 'A=b c' stap --runtime=bpf"])
    assert config.stap == ["env", "A=b c", "stap", "--runtime=bpf"]


def test_default_scripts_dir_is_documented_in_help():
    assert cli.default_scripts_dir() in cli.usage_text()
    # stappaths(7)'s location, which no installation puts a script in.
    assert cli.default_scripts_dir() == "/etc/stap-exporter"
