#!/usr/bin/env python3
"""Footprint: resident memory of an idle exporter, beside node_exporter's.

The exporter runs on Debian's python3 (``--python`` to choose another) with
an empty scripts directory, from a copy of the package with its bytecode
compiled, as an installed package has it (without it, every start compiles
the sources, and the compiler's leftovers stay resident); after a few scrapes of /metrics its VmRSS is
read, several times over (a fresh exporter each time).  Then the same for
``prometheus-node-exporter`` on a loopback port, when it is installed
(``apt-get install prometheus-node-exporter``), and for a bare python3 with
the stack's imports alone (gevent patched as the exporter patches it,
pywsgi, gevent.subprocess, docopt, prometheus_client): the floor; and the
floor again with gevent's plugin look-up, which Debian 12's gevent does with
pkg_resources.

    python3 bench/footprint.py [--repeat N] [--python PATH]
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import _common as C

NODE_EXPORTER = "prometheus-node-exporter"
SCRAPES = 5
# What the stack's imports cost without the exporter's code: the floor, gevent
# patched as stapexporter.py patches it.  FLOOR_WITH_PLUGINS patches as
# gevent.monkey does by default: before gevent 23.7 its plugin look-up imports
# pkg_resources.
STACK = """
import gevent.pywsgi, gevent.subprocess, docopt, prometheus_client
import sys, time
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(60)
"""
FLOOR = """
import sys, types
from gevent import monkey
no_plugins = types.ModuleType("pkg_resources")
no_plugins.iter_entry_points = lambda group, name=None: iter(())
sys.modules.setdefault("pkg_resources", no_plugins)
monkey.patch_all(ssl=False, dns=False)
del sys.modules["pkg_resources"]
""" + STACK
FLOOR_WITH_PLUGINS = """
from gevent import monkey
monkey.patch_all(ssl=False, dns=False)
""" + STACK


def compiled_copy(python, tmp):
    """A copy of the program with its bytecode written, as installed."""
    tree = os.path.join(tmp, "tree")
    if os.path.exists(tree):
        return tree
    shutil.copytree(os.path.join(C.ROOT, "stapexporter_lib"),
                    os.path.join(tree, "stapexporter_lib"))
    shutil.copy(C.EXPORTER, tree)
    subprocess.run([python, "-m", "compileall", "-q", tree], check=True,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
    return tree


def exporter_rss(python, tmp):
    scripts = os.path.join(tmp, "scripts")
    procfs = os.path.join(tmp, "procfs")
    for d in (scripts, procfs):
        os.makedirs(d, exist_ok=True)
    exp = C.Exporter(scripts, procfs, python=python,
                     exporter=os.path.join(compiled_copy(python, tmp), "stapexporter.py"))
    try:
        for _ in range(SCRAPES):
            C.fetch(exp.port, "/metrics")
        time.sleep(0.5)
        return C.rss_kib(exp.pid) / 1024.0
    finally:
        exp.stop()


def node_exporter_rss():
    path = shutil.which(NODE_EXPORTER)
    if path is None:
        return None
    port = C.free_port()
    proc = subprocess.Popen([path, "--web.listen-address=%s:%d" % (C.HOST, port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    C.on_exit(lambda: C.stop_process(proc))
    try:
        C.wait_port(port, proc, NODE_EXPORTER)
        for _ in range(SCRAPES):
            C.fetch(port, "/metrics")
        time.sleep(0.5)
        return C.rss_kib(proc.pid) / 1024.0
    finally:
        C.stop_process(proc)


def floor_rss(python, code):
    proc = subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    C.on_exit(lambda: C.stop_process(proc))
    try:
        proc.stdout.readline()
        return C.rss_kib(proc.pid) / 1024.0
    finally:
        C.stop_process(proc)


def main():
    ap = argparse.ArgumentParser(description="stap-exporter idle footprint")
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes measured (5)")
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="interpreter for the exporter (Debian's)")
    args = ap.parse_args()
    print("footprint: %s; exporter on %s" % (C.machine_line(), args.python))
    tmp = C.make_tempdir()
    rows = []
    ours = [exporter_rss(args.python, tmp) for _ in range(args.repeat)]
    rows.append(["stap-exporter, idle, after %d scrapes of /metrics" % SCRAPES,
                 "%.1f" % C.median(ours), "%.1f..%.1f" % (min(ours), max(ours))])
    floor = [floor_rss(args.python, FLOOR) for _ in range(args.repeat)]
    rows.append(["floor: python3 with the stack's imports only", "%.1f" % C.median(floor),
                 "%.1f..%.1f" % (min(floor), max(floor))])
    plugins = [floor_rss(args.python, FLOOR_WITH_PLUGINS) for _ in range(args.repeat)]
    rows.append(["same, gevent's plugins looked up (pkg_resources, gevent < 23.7)",
                 "%.1f" % C.median(plugins), "%.1f..%.1f" % (min(plugins), max(plugins))])
    node = [node_exporter_rss() for _ in range(args.repeat)]
    if node[0] is None:
        rows.append([NODE_EXPORTER, "not installed", "-"])
    else:
        rows.append([NODE_EXPORTER + ", after %d scrapes" % SCRAPES, "%.1f" % C.median(node),
                     "%.1f..%.1f" % (min(node), max(node))])
    print(C.table(["process", "RSS MiB (median)", "range"], rows))
    print("SUMMARY footprint: stap-exporter %.1f MiB idle (floor %.1f MiB)%s"
          % (C.median(ours), C.median(floor),
             "" if node[0] is None else ", %s %.1f MiB" % (NODE_EXPORTER, C.median(node))))
    return 0


if __name__ == "__main__":
    C.main_wrapper(main)
