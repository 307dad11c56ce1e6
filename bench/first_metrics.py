#!/usr/bin/env python3
"""Time to first metrics: from the first request for a stopped script to its
first 200, polling every 50 ms (each poll is a new request, as a user
refreshing would do).  Measured for a stand-in script (fakestap, no compile
delay) and for a real BPF-runtime script (real ``stap --runtime=bpf`` set up
by tools/stap-bpf-setup; skipped with a message when not root or stap is
missing), first start and again after a keepalive stop (``-k 2``: the bench
waits until the index page ``/`` shows the script stopped, then asks again).

    python3 bench/first_metrics.py
    python3 bench/first_metrics.py --rounds 5 --no-real
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

POLL = 0.05
KEEPALIVE = 2

REAL_SCRIPT = """\
global ticks%
probe timer.ms(100) { ticks[cpu()]++ }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
"""


def time_to_first(exp, path, timeout=120.0):
    """Seconds from the first request to the first 200; number of polls."""
    t0 = time.monotonic()
    polls = 0
    while True:
        polls += 1
        try:
            st, _, _ = exp.get(path, timeout=30)
        except OSError:
            st = None
        if st == 200:
            return time.monotonic() - t0, polls
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("%s: no 200 within %g s (last %s)" % (path, timeout, st))
        time.sleep(POLL)


def wait_stopped(exp, name, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if exp.index_states().get(name) == "stopped":
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError("%s did not stop after the keepalive" % name)


def measure(exp, name, rounds):
    """[(label, seconds, polls)]: first start, then after each keepalive stop."""
    out = []
    for i in range(rounds):
        if i:
            wait_stopped(exp, name)
        secs, polls = time_to_first(exp, "/" + name)
        out.append(("first start" if i == 0 else "after keepalive stop #%d" % i, secs, polls))
        print("  %-12s %-26s %7.3f s  (%d requests)" % (name, out[-1][0], secs, polls),
              flush=True)
    return out


def real_skip_reason():
    if os.geteuid() != 0:
        return "not root (the BPF runtime needs root)"
    for tool in ("stap", "stapbpf", "gcc"):
        if shutil.which(tool) is None:
            return "%s not found (apt-get install systemtap gcc)" % tool
    return None


def main():
    ap = argparse.ArgumentParser(description="stap-exporter time-to-first-metrics benchmark")
    ap.add_argument("--rounds", type=int, default=3,
                    help="first start + (ROUNDS-1) restarts after a keepalive stop (default 3)")
    ap.add_argument("--no-real", action="store_true", help="skip the real BPF-runtime script")
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    print("time-to-first-metrics benchmark: %s; poll every %d ms; -k %d"
          % (C.machine_line(), POLL * 1000, KEEPALIVE))

    rows = []
    tmp = C.make_tempdir()
    scripts, procfs = os.path.join(tmp, "scripts"), os.path.join(tmp, "procfs")
    os.makedirs(scripts)
    os.makedirs(procfs)
    C.write_script(scripts, "fake_fifo.stp", "mode=fifo")
    C.write_script(scripts, "fake_file.stp", "mode=file")
    exp = C.Exporter(scripts, procfs, args=["-k", str(KEEPALIVE)])
    for name in ("fake_fifo.stp", "fake_file.stp"):
        for label, secs, polls in measure(exp, name, rounds):
            rows.append(["stand-in " + name, label, "%.3f" % secs, polls])
    left = exp.stop()

    real = None
    reason = None if not args.no_real else "--no-real given"
    reason = reason or real_skip_reason()
    if reason:
        print("real BPF runtime: skipped: %s" % reason)
    else:
        rdir = os.path.join(tmp, "realstap")
        setup = subprocess.run([C.STAP_BPF_SETUP, rdir], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        if setup.returncode != 0:
            reason = "stap-bpf-setup failed: %s" % setup.stderr.decode().strip()
            print("real BPF runtime: skipped: %s" % reason)
        else:
            wrapper = setup.stdout.decode().strip()
            rscripts = os.path.join(tmp, "rscripts")
            os.makedirs(rscripts)
            with open(os.path.join(rscripts, "ticks.stp"), "w") as f:
                f.write(REAL_SCRIPT)
            # Restarts reuse the kept compiled module (stapbpf runs it directly;
            # it needs the setrlimit shim in the exporter's own environment on
            # this kind of machine), or compile afresh with --recompile.
            shim = os.path.join(os.path.dirname(wrapper), "setrlimit-shim.so")
            real = {}
            for mode, extra, env in (("reuse", [], {"LD_PRELOAD": shim}),
                                     ("--recompile", ["--recompile"], {})):
                rexp = C.Exporter(rscripts, "/proc/systemtap:/var/tmp/systemtap-root",
                                  args=["-k", str(KEEPALIVE)] + extra, stap=wrapper, env=env)
                real[mode] = measure(rexp, "ticks.stp", rounds)
                for label, secs, polls in real[mode]:
                    rows.append(["real BPF ticks.stp (%s)" % mode, label, "%.3f" % secs, polls])
                left += rexp.stop()

    print()
    print(C.table(["script", "when", "seconds", "requests"], rows))
    fake_first = [r for r in rows if r[0] == "stand-in fake_fifo.stp"]
    summary = "stand-in FIFO %s s first, %s s after a keepalive stop" % (
        fake_first[0][2], fake_first[1][2] if len(fake_first) > 1 else "-")
    if real:
        for mode, results in real.items():
            summary += "; real BPF (%s) %.2f s first, %s s after a keepalive stop" % (
                mode, results[0][1], "%.2f" % results[1][1] if len(results) > 1 else "-")
    else:
        summary += "; real BPF skipped (%s)" % reason
    print("\nSUMMARY first_metrics: %s%s" % (summary,
                                            "; children left behind: %s" % left if left else ""))
    return 0 if not left else 1


if __name__ == "__main__":
    C.main_wrapper(main)
