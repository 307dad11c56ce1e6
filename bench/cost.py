#!/usr/bin/env python3
"""What the kernel-cost and series metrics cost the scrape path: scrapes/s
of a script and of /metrics on the code before them (a git revision,
extracted with ``git archive``) and on this copy, without and with
--bpf-stats; then, in this process, what each part costs once.

    python3 bench/cost.py --baseline REV          # 5 s a cell, median of 5 runs
    python3 bench/cost.py --duration 3 --repeat 1 --no-real

Cells (keep-alive clients, wrk when installed):
* ``/wide.stp``: a stand-in regular-file script of 200 lines (~8 KiB), each
  body counted for the series gauge (and checked against --max-series);
* ``/metrics`` with 20 stand-in scripts running;
* ``/metrics`` with 5 real BPF-runtime scripts (10 ms timers) running, whose
  programs' and maps' descriptors are read from /proc at most once a second
  (skipped when not root or systemtap is missing).
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from first_metrics import real_skip_reason  # noqa: E402

STAND_INS = 20
REAL_SCRIPTS = 5
LINES = 200
REAL_SCRIPT = """global ticks%
probe timer.ms(10) { ticks[cpu()]++ }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
"""
REAL_PROCFS = "/proc/systemtap:/var/tmp/systemtap-root"


def extract(rev, into):
    """The project at REV (of this checkout's repository) as files in INTO."""
    os.makedirs(into)
    top = subprocess.run(["git", "-C", C.BENCH, "rev-parse", "--show-toplevel"],
                         stdout=subprocess.PIPE, check=True).stdout.decode().strip()
    archive = subprocess.run(["git", "-C", top, "archive", rev], stdout=subprocess.PIPE,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return os.path.join(into, "stapexporter.py")


def main():
    ap = argparse.ArgumentParser(description="cost of the kernel-cost and series metrics")
    ap.add_argument("--baseline", help="git revision of the code before them (default: none)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds a cell (default 5)")
    ap.add_argument("--repeat", type=int, default=5, help="runs a cell; the median counts")
    ap.add_argument("--connections", type=int, default=16, help="keep-alive clients (16)")
    ap.add_argument("--no-real", action="store_true", help="skip the real BPF-runtime part")
    args = ap.parse_args()
    print("cost-metrics benchmark: %s; %g s a cell, median of %d, %d clients, %s"
          % (C.machine_line(), args.duration, args.repeat, args.connections,
             "wrk" if C.have_wrk() else "python client (lower bounds)"))

    tmp = C.make_tempdir()
    codes = [("after", C.EXPORTER, []), ("after --bpf-stats", C.EXPORTER, ["--bpf-stats"])]
    if args.baseline:
        codes.insert(0, ("before (%s)" % args.baseline,
                         extract(args.baseline, os.path.join(tmp, "before")), []))
    stand_ins = os.path.join(tmp, "scripts")
    procfs = os.path.join(tmp, "procfs")
    os.makedirs(stand_ins)
    os.makedirs(procfs)
    C.write_script(stand_ins, "wide.stp", "mode=file lines=%d" % LINES)
    for i in range(STAND_INS - 1):
        C.write_script(stand_ins, "s%02d.stp" % i, "mode=file")

    reason = "--no-real given" if args.no_real else real_skip_reason()
    wrapper = None
    if reason is None:
        setup = subprocess.run([C.STAP_BPF_SETUP, os.path.join(tmp, "realstap")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if setup.returncode:
            reason = "stap-bpf-setup failed: %s" % setup.stderr.decode().strip()
        else:
            wrapper = setup.stdout.decode().strip()
            real = os.path.join(tmp, "real")
            os.makedirs(real)
            for i in range(REAL_SCRIPTS):
                with open(os.path.join(real, "ticks%d.stp" % i), "w") as f:
                    f.write(REAL_SCRIPT + "// %d\n" % i)  # its own module each

    # Every exporter runs at once and the cells take turns, run after run,
    # so that a neighbour's load on a shared machine falls on all of them.
    started = []
    for label, exporter, extra in codes:
        exp = C.Exporter(stand_ins, procfs, args=extra, exporter=exporter)
        for i in range(STAND_INS - 1):
            exp.get_until("/s%02d.stp" % i)
        exp.get_until("/wide.stp")
        urls = [exp.url + "/wide.stp", exp.url + "/metrics"]
        rexp = None
        if wrapper:
            shim = os.path.join(os.path.dirname(wrapper), "setrlimit-shim.so")
            rexp = C.Exporter(real, REAL_PROCFS, args=extra, stap=wrapper,
                              env={"LD_PRELOAD": shim}, exporter=exporter)
            for i in range(REAL_SCRIPTS):
                rexp.get_until("/ticks%d.stp" % i, timeout=120)
            urls.append(rexp.url + "/metrics")
        started.append((label, urls, rexp))
    runs = {(label, url): [] for label, urls, _ in started for url in urls}
    for _ in range(max(1, args.repeat)):
        for label, urls, _ in started:
            for url in urls:
                runs[label, url].append(C.run_load(url, args.connections, args.duration,
                                                   threads=2).rps)
    rows = []
    for label, urls, rexp in started:
        row = [label] + ["%.0f" % C.median(runs[label, url]) for url in urls]
        if rexp is not None:
            row.append(in_process_costs(rexp) if label == "after" else "")
        rows.append(row)
        print("  " + "  ".join(row), flush=True)

    headers = ["code", "/wide.stp req/s", "/metrics (%d stand-ins) req/s" % STAND_INS]
    if wrapper:
        headers += ["/metrics (%d real BPF) req/s" % REAL_SCRIPTS, "one pass, in-process"]
    else:
        print("real BPF runtime: skipped: %s" % reason)
    print()
    print(C.table(headers, rows))
    print("\nSUMMARY cost: " + "; ".join("%s: script %s/s, /metrics %s/s" % (r[0], r[1], r[2])
                                         for r in rows))
    return 0


def in_process_costs(exp):
    """Microseconds of one /proc pass over the real scripts' groups (what
    /metrics does at most once a second), of its kernel part alone, and of
    counting a 200-line body's samples."""
    sys.path.insert(0, C.ROOT)
    from stapexporter_lib.scripts import bpfstats, proccost
    from stapexporter_lib.scripts.output import count_samples
    groups = {}
    for pid in exp.children():
        try:
            groups[os.getpgid(pid)] = None
        except OSError:
            continue

    def per_call(fn, n):
        began = time.perf_counter()
        for _ in range(n):
            result = fn()
        return (time.perf_counter() - began) / n * 1e6, result

    whole, costs = per_call(lambda: proccost.group_costs(groups, modules=groups), 50)
    members = [[int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(p) == g]
               for g in costs]
    kernel, _ = per_call(lambda: [bpfstats.kernel_cost(m, None) for m in members], 50)
    body = b"".join(b'x{n="%d"} %d\n' % (i, i) for i in range(LINES))
    count, _ = per_call(lambda: count_samples(body), 10000)
    return "pass %.0f us (kernel part %.0f us, %d groups); 200-line count %.1f us" % (
        whole, kernel, len(costs), count)


def _pgid(pid):
    try:
        return os.getpgid(int(pid))
    except OSError:
        return None


if __name__ == "__main__":
    C.main_wrapper(main)
