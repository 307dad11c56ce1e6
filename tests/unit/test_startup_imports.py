"""Modules a started exporter must not load: each would stay resident for the
process's life, unused (bench/footprint.py measures the idle exporter)."""

import subprocess
import sys

import pytest

from conftest import ROOT

# The entry point's patching, then a listener as the server makes it.
START = """
import sys
import stapexporter
from stapexporter_lib import server
server.make_listener("127.0.0.1", 0).close()
print(" ".join(sorted(sys.modules)))
"""


@pytest.fixture(scope="module")
def loaded():
    proc = subprocess.run([sys.executable, "-c", START], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=60, check=True)
    return set(proc.stdout.decode().split())


@pytest.mark.parametrize("module,why", [
    ("pkg_resources", "gevent's plugin look-up (gevent before 23.7)"),
    ("pprint", "the hub's default formatter of error contexts"),
    ("encodings.idna", "getaddrinfo() of a str host"),
])
def test_start_up_does_not_load(loaded, module, why):
    assert "stapexporter_lib.server" in loaded
    assert module not in loaded, why
