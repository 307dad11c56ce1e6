#!/usr/bin/env python3
"""Scale: start-up time and memory with many scripts, and idle CPU.

For 10, 100 and 1000 scripts in the directory: the exporter's start-up time
(spawn -> "listening" log line, and -> first 200 from ``/``) and its RSS
(VmRSS) with 0, 1, 10 and 100 of them running (stand-in children started by
requesting them).  Then the exporter's idle CPU (utime+stime) over a window
with 100 running scripts and no requests.

    python3 bench/scale.py                 # 60 s idle window
    python3 bench/scale.py --quick         # 10 s idle window
    python3 bench/scale.py --idle 120 --mode file

Targets: idle CPU <= 0.5 % of one core with 100 running scripts;
RSS <= 60 MiB with 1000 known and 100 running.
"""

import argparse
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

TARGET_IDLE_CPU = 0.005
TARGET_RSS_MIB = 60.0


def settle_rss(pid, seconds=1.0):
    time.sleep(seconds)
    return C.rss_kib(pid) / 1024.0


def start_scripts(exp, names):
    """Request each of NAMES until it answers 200 (10 at a time)."""
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda n: exp.get_until("/" + n, timeout=60), names))


def main():
    ap = argparse.ArgumentParser(description="stap-exporter scale benchmark")
    ap.add_argument("--quick", action="store_true", help="10 s idle window")
    ap.add_argument("--idle", type=float, help="idle CPU window in seconds (default 60)")
    ap.add_argument("--mode", choices=("file", "fifo"), default="fifo",
                    help="stand-in output kind (default fifo: children sleep in open())")
    args = ap.parse_args()
    idle = args.idle or (10.0 if args.quick else 60.0)
    print("scale benchmark: %s; stand-in children: %s mode; idle window %g s"
          % (C.machine_line(), args.mode, idle))

    rows = []
    idle_cpu = None
    rss_1000_100 = None
    for n in (10, 100, 1000):
        tmp = C.make_tempdir()
        scripts, procfs = os.path.join(tmp, "scripts"), os.path.join(tmp, "procfs")
        os.makedirs(scripts)
        os.makedirs(procfs)
        names = ["s%04d.stp" % i for i in range(n)]
        for name in names:
            C.write_script(scripts, name, "mode=%s" % args.mode)
        exp = C.Exporter(scripts, procfs)
        t_listen = exp.t_listening - exp.t_spawn
        exp.get_until("/", interval=0.01)
        t_index = time.monotonic() - exp.t_spawn
        running = 0
        rss = settle_rss(exp.pid)
        rows.append([n, 0, "%.3f" % t_listen, "%.3f" % t_index, "%.1f" % rss,
                     C.open_fds(exp.pid)])
        print("  %4d scripts: listening after %.3f s, / answers after %.3f s, RSS %.1f MiB"
              % (n, t_listen, t_index, rss), flush=True)
        for k in (1, 10, 100):
            if k > n:
                continue
            t0 = time.monotonic()
            start_scripts(exp, names[running:k])
            running = k
            rss = settle_rss(exp.pid)
            kids = len(exp.children())
            rows.append([n, k, "-", "-", "%.1f" % rss, C.open_fds(exp.pid)])
            print("  %4d scripts, %3d running (%d children; started in %.1f s): RSS %.1f MiB"
                  % (n, k, kids, time.monotonic() - t0, rss), flush=True)
            if n == 1000 and k == 100:
                rss_1000_100 = rss
            if n == 100 and k == 100:
                time.sleep(2.0)
                c0, w0 = C.cpu_seconds(exp.pid), time.monotonic()
                time.sleep(idle)
                c1, w1 = C.cpu_seconds(exp.pid), time.monotonic()
                idle_cpu = (c1 - c0) / (w1 - w0)
                print("  idle CPU with 100 running scripts over %.0f s: %.3f%% of one core"
                      " (%.2f s CPU)" % (w1 - w0, 100 * idle_cpu, c1 - c0), flush=True)
        t0 = time.monotonic()
        left = exp.stop()
        print("  stopped in %.1f s%s" % (time.monotonic() - t0,
                                         "; LEFT BEHIND: %s" % left if left else ""))
        if left:
            print("error: children left behind", file=sys.stderr)
            return 1

    print()
    print(C.table(["scripts", "running", "listening s", "first / s", "RSS MiB", "fds"], rows))
    ok_cpu = idle_cpu is not None and idle_cpu <= TARGET_IDLE_CPU
    ok_rss = rss_1000_100 is not None and rss_1000_100 <= TARGET_RSS_MIB
    print("\ntarget idle CPU <= 0.5%% of a core (100 running): %.3f%% %s"
          % (100 * (idle_cpu or 0), "PASS" if ok_cpu else "FAIL"))
    print("target RSS <= 60 MiB (1000 known, 100 running): %.1f MiB %s"
          % (rss_1000_100 or 0, "PASS" if ok_rss else "FAIL"))
    start_1000 = [r for r in rows if r[0] == 1000 and r[1] == 0][0]
    print("\nSUMMARY scale: start-up %s s with 1000 scripts; RSS %.1f MiB with 1000 known/100"
          " running (target <= 60); idle CPU %.3f%% of a core with 100 running over %g s"
          " (target <= 0.5%%); %s" % (
              start_1000[3], rss_1000_100 or 0, 100 * (idle_cpu or 0), idle,
              "all targets met" if ok_cpu and ok_rss else "TARGETS MISSED"))
    return 0


if __name__ == "__main__":
    C.main_wrapper(main)
