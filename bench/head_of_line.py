#!/usr/bin/env python3
"""Head-of-line blocking: latency of scrapes of a healthy script while
another script's FIFO never gets a writer (``# fake: mode=fifo never_write``)
and 50 clients keep scraping that stuck one (the script never leaves the
"starting" state, so each of their requests waits the exporter's 1 s start
wait and gets a 503; a running script would hold them for the 5 s deadline).

Phases, each DURATION seconds: healthy alone (baseline), then healthy while
the 50 stuck clients run.  Healthy load: 1 and 16 keep-alive clients.

    python3 bench/head_of_line.py            # 5 s a phase
    python3 bench/head_of_line.py --quick    # 3 s a phase
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

STUCK_CLIENTS = 50


def main():
    ap = argparse.ArgumentParser(description="stap-exporter head-of-line benchmark")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration", type=float, help="seconds a phase (default 5, quick 3)")
    ap.add_argument("--mode", choices=("file", "fifo"), default="file",
                    help="output of the healthy script (default file)")
    args = ap.parse_args()
    duration = args.duration or (3.0 if args.quick else 5.0)
    print("head-of-line benchmark: %s; %g s a phase; %d clients on the stuck script"
          % (C.machine_line(), duration, STUCK_CLIENTS))

    tmp = C.make_tempdir()
    scripts, procfs = os.path.join(tmp, "scripts"), os.path.join(tmp, "procfs")
    os.makedirs(scripts)
    os.makedirs(procfs)
    C.write_script(scripts, "healthy.stp", "mode=%s lines=200" % args.mode)
    C.write_script(scripts, "stuck.stp", "mode=fifo never_write")
    exp = C.Exporter(scripts, procfs)
    exp.get_until("/healthy.stp")
    # Start the stuck one: its first request answers 503 once the start wait ends.
    st, _, _ = exp.get("/stuck.stp", timeout=15)
    print("stuck.stp answers %d (expected 503)" % st)

    rows = []
    res = {}
    for c in (1, 16):
        base = C.run_load(exp.url + "/healthy.stp", c, duration, threads=1 if c == 1 else 2)
        # Stuck load runs a little longer than the measured phase so it covers it.
        stuck = C.LoadProcess(exp.url + "/stuck.stp", STUCK_CLIENTS, duration + 7, timeout=10)
        time.sleep(1.0)
        loaded = C.run_load(exp.url + "/healthy.stp", c, duration,
                            threads=1 if c == 1 else 2)
        s = stuck.join(duration + 60)
        res[c] = (base, loaded, s)
        for label, r in (("healthy alone", base), ("healthy + 50 stuck", loaded)):
            rows.append([label, c, "%.0f" % r.rps, C.ms(r.p50), C.ms(r.p99), C.ms(r.max),
                         r.errors])
        rows.append(["(stuck.stp clients)", STUCK_CLIENTS, "%.1f" % s.rps, C.ms(s.p50),
                     C.ms(s.p99), C.ms(s.max), "%d non-200" % s.errors])
    print()
    print(C.table(["load", "clients", "req/s", "p50 ms", "p99 ms", "max ms", "errors"], rows))
    left = exp.stop()
    b1, l1, _ = res[1]
    b16, l16, _ = res[16]
    ratio = l1.p99 / b1.p99 if b1.p99 else 0
    verdict = ("no head-of-line blocking" if l1.max < 1.0 and l16.max < 1.0
               and l1.errors == 0 and l16.errors == 0 else "HEAD-OF-LINE BLOCKING")
    print("\nSUMMARY head_of_line: healthy p99 with 50 clients on a stuck FIFO: %s ms at 1"
          " client (alone %s ms, %.1fx), %s ms at 16 (alone %s ms); max %s ms; %s%s" % (
              C.ms(l1.p99), C.ms(b1.p99), ratio, C.ms(l16.p99), C.ms(b16.p99),
              C.ms(max(l1.max, l16.max)), verdict,
              "; children left behind: %s" % left if left else ""))
    return 0 if not left else 1


if __name__ == "__main__":
    C.main_wrapper(main)
