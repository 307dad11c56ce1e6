#!/usr/bin/env python3
"""Lean process trees: what a running script costs the host, on the real BPF
runtime, with plain scripts compiled and then run by stapbpf alone
("direct", the default) side by side with the stap driver way ("driver":
STAP -m MODULE FILE, where an idle stap waits beside stapbpf; forced by
giving --stap an option the loaders have no equivalent for,
``--skip-badvars``, harmless for these timer scripts).

For 1 and 20 running scripts (each a distinct timer script with a
``probe end`` that prints a line), in one run, the two ways taking turns
(--repeat times each, 5 by default, so that both see the same machine; the
figures are medians over the repeats):
  * resident memory of each script's whole process tree: the sum of VmRSS
    over its process group (the loader, or stap + stapbpf);
  * time to first metrics: from the first request for a stopped script to
    its first 200, polling every 50 ms, all scripts asked at once (the
    exporter compiles at most --max-starting 4 at a time in both ways);
    every start compiles (a fresh --cache-dir per exporter, distinct scripts);
  * the start alone: spawn to output, as the exporter measured it
    (stap_exporter_script_start_seconds), without the first read of the
    output, which waits for the timer's first tick (an empty FIFO cycle is
    retried after 5, 10, 20, 40, 80 ms...) and so adds the same up to ~0.1 s
    of quantisation to both ways;
  * whether each script's ``probe end`` output was delivered (logged) when
    the exporter stopped it;
  * for the direct way, also the first metrics after an exporter restart
    ("direct, kept"): a new exporter on the same --cache-dir loads the
    modules the first one compiled, as after a service restart or a reboot.

Needs root, stap and stapbpf (tools/stap-bpf-setup prepares the runtime,
including the setrlimit shim the loaders need in this sandbox).

    python3 bench/lean.py
    python3 bench/lean.py --counts 1,5 --repeat 3
"""

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

POLL = 0.05
PROCFS = "/proc/systemtap:/var/tmp/systemtap-root"
# A translator option the loaders lack: with it in --stap, plain scripts
# run through the stap driver.
DRIVER_OPTION = "--skip-badvars"

SCRIPT = """\
// lean benchmark script %(i)d
global ticks%%
probe timer.ms(100) { ticks[cpu()]++ }
probe prometheus { @prometheus_dump_array1(ticks, "ticks", "cpu") }
probe end { printf("probe-end-ran script=%(i)d\\n") }
"""


def first_metrics(exp, names, timeout=300.0):
    """{name: seconds to the first 200}, all asked at once."""
    out = {}

    def poll(name):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                status, _, _ = exp.get("/" + name, timeout=30)
            except OSError:
                status = None
            if status == 200:
                out[name] = time.monotonic() - t0
                return
            time.sleep(POLL)
    threads = [threading.Thread(target=poll, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = set(names) - set(out)
    if missing:
        raise RuntimeError("no metrics within %g s from %s" % (timeout, sorted(missing)))
    return out


def start_times(exp):
    """[seconds from spawn to output] of every running script, from the
    exporter's own stap_exporter_script_start_seconds: the start alone,
    without the first read of the output."""
    status, _, body = exp.get("/metrics", timeout=30)
    if status != 200:
        raise RuntimeError("GET /metrics: %s" % status)
    return [float(m.group(1)) for m in re.finditer(
        r'^stap_exporter_script_start_seconds\{[^}]*\} (\S+)$', body.decode(), re.M)]


def burst_cpu(exp):
    """CPU seconds (user + system) spent so far by the exporter and all it
    started: the live processes' own time, to the nanosecond
    (/proc/PID/task/*/schedstat), plus what their reaped children (and the
    exporter's: killed compilers, a chain's subshells) spent (cutime +
    cstime).  Taken at the last first metrics, it is what the burst of
    starts cost the 2 cores, a figure far steadier than the wall clock."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [exp.pid] + C.processes_matching(exp.module_prefix):
        try:
            for task in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
                    total += int(f.read().split()[0]) / 1e9
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[13]) + int(fields[14])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def group_rss(pgid):
    """(processes, KiB of VmRSS summed) of process group PGID."""
    count, total = 0, 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == pgid:
                total += C.rss_kib(int(entry))
                count += 1
        except OSError:
            continue
    return count, total


def trees(exp):
    """[(processes, KiB)] per running script (one process group each)."""
    groups = set()
    for pid in C.processes_matching(exp.module_prefix):
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            continue
    return [group_rss(g) for g in sorted(groups)]


def run(mode, stap, shim, count, tmp, rep):
    """One exporter, COUNT scripts (a fresh set and --cache-dir per repeat
    REP): the row of figures.  Mode "kept" is a second exporter on the cache
    the "direct" one of the same repeat filled."""
    scripts = os.path.join(tmp, "%d-%d-scripts" % (count, rep))
    if not os.path.isdir(scripts):
        os.makedirs(scripts)
        for i in range(count):
            with open(os.path.join(scripts, "lean%02d.stp" % i), "w") as f:
                f.write(SCRIPT % {"i": i + 100 * rep})
    names = sorted(os.listdir(scripts))
    env = {"LD_PRELOAD": shim}
    if mode == "driver":
        stap = stap + " " + DRIVER_OPTION
    cache = os.path.join(tmp, "%d-%d-cache-%s" % (count, rep, "driver" if mode == "driver"
                                                  else "direct"))
    exp = C.Exporter(scripts, PROCFS, stap=stap, env=env, log_level="debug",
                     args=["--cache-dir", cache])
    firsts = first_metrics(exp, names)
    cpu = burst_cpu(exp)
    time.sleep(1.0)  # let every tree settle (stap forks stapbpf after its compile)
    measured = trees(exp)
    starts = start_times(exp)
    left = exp.stop()
    text = "\n".join(exp.log_lines)
    ended = len(set(re.findall(r"probe-end-ran script=(\d+)", text)))
    compiled = len(re.findall(r"event=(?:compiling|spawned) .*run=driver|event=compiling", text))
    per_tree = [kib for _n, kib in measured]
    return {
        "mode": mode, "count": count, "procs": statistics.mean(n for n, _ in measured),
        "tree_mib": statistics.mean(per_tree) / 1024, "total_mib": sum(per_tree) / 1024,
        "first_median": statistics.median(firsts.values()), "first_max": max(firsts.values()),
        "start_median": statistics.median(starts), "cpu": cpu,
        "ended": ended, "left": left, "trees": len(measured), "compiled": compiled,
    }


def combine(runs):
    """The medians over the repeats of one way and count."""
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("procs", "tree_mib", "total_mib", "first_median", "first_max",
                     "start_median", "cpu")}
    med.update(mode=runs[0]["mode"], count=runs[0]["count"], repeats=len(runs),
               ended=min(r["ended"] for r in runs), compiled=max(r["compiled"] for r in runs),
               left=[p for r in runs for p in r["left"]],
               medians=[r["first_median"] for r in runs],
               starts=[r["start_median"] for r in runs], cpus=[r["cpu"] for r in runs])
    return med


def paired(direct, driver, resamples=10000):
    """(median, low, high): the median of the per-repeat differences
    DIRECT - DRIVER (the ways took turns, so each pair saw the same spell of
    the machine) and its 95 % bootstrap interval.  An interval that holds 0
    is a difference this run could not tell from the machine's noise."""
    diffs = [a - b for a, b in zip(direct, driver)]
    rng = random.Random(12)  # the same figures for the same run
    boots = sorted(statistics.median(rng.choices(diffs, k=len(diffs)))
                   for _ in range(resamples))
    return (statistics.median(diffs), boots[int(0.025 * resamples)],
            boots[int(0.975 * resamples) - 1])


def prepare(tmp):
    rdir = os.path.join(tmp, "realstap")
    setup = subprocess.run([C.STAP_BPF_SETUP, rdir], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    if setup.returncode != 0:
        raise SystemExit("stap-bpf-setup failed: %s" % setup.stderr.decode().strip())
    wrapper = setup.stdout.decode().strip().splitlines()[-1]
    return wrapper, os.path.join(os.path.dirname(wrapper), "setrlimit-shim.so")


MODES = ("direct", "driver", "kept")


def main():
    ap = argparse.ArgumentParser(description="stap-exporter lean process tree benchmark")
    ap.add_argument("--counts", default="1,20", help="numbers of running scripts (1,20)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each way, taking turns (5)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("lean: skipped: not root (the BPF runtime needs root)")
        return 0
    print("lean process tree benchmark: %s; real BPF runtime; timer script with probe end;"
          " %d repeats" % (C.machine_line(), args.repeat))
    tmp = C.make_tempdir()
    stap, shim = prepare(tmp)
    results = []
    for count in [int(c) for c in args.counts.split(",")]:
        runs = {mode: [] for mode in MODES}
        for rep in range(args.repeat):
            order = MODES if rep % 2 == 0 else ("driver", "direct", "kept")
            for mode in order:
                runs[mode].append(run(mode, stap, shim, count, tmp, rep))
            print("  %2d scripts, repeat %d: first metrics median direct %.2f s, driver %.2f s,"
                  " direct with kept modules %.2f s" % (
                      count, rep + 1, runs["direct"][-1]["first_median"],
                      runs["driver"][-1]["first_median"], runs["kept"][-1]["first_median"]),
                  flush=True)
        results += [combine(runs[mode]) for mode in MODES]
    rows = [[r["mode"], r["count"], "%.1f" % r["procs"], "%.1f" % r["tree_mib"],
             "%.1f" % r["total_mib"], "%.2f" % r["first_median"], "%.2f" % r["first_max"],
             "%.3f" % r["start_median"], "%.2f" % r["cpu"],
             "%d/%d" % (r["ended"], r["count"])] for r in results]
    print()
    print(C.table(["way", "scripts", "processes/script", "tree RSS MiB/script",
                   "total RSS MiB", "first metrics median s", "max s", "start median s",
                   "CPU s to first metrics", "probe end delivered"],
                  rows))
    summary, left = [], []
    for count in sorted({r["count"] for r in results}):
        by = {r["mode"]: r for r in results if r["count"] == count}
        wins = sum(1 for a, b in zip(by["direct"]["medians"], by["driver"]["medians"]) if a <= b)
        first = paired(by["direct"]["medians"], by["driver"]["medians"])
        start = paired(by["direct"]["starts"], by["driver"]["starts"])
        cpu = paired(by["direct"]["cpus"], by["driver"]["cpus"])
        summary.append("%d scripts: tree RSS %.1f vs %.1f MiB (%.2fx), first metrics %.2f vs"
                       " %.2f s (direct no slower in %d of %d repeats; direct - driver %+.3f s,"
                       " 95%% interval %+.3f..%+.3f; kept modules %.2f s),"
                       " start %.3f vs %.3f s (direct - driver %+.4f s, %+.4f..%+.4f),"
                       " CPU to first metrics %.2f vs %.2f s (direct - driver %+.3f s,"
                       " %+.3f..%+.3f)"
                       % ((count, by["direct"]["tree_mib"], by["driver"]["tree_mib"],
                           by["direct"]["tree_mib"] / by["driver"]["tree_mib"],
                           by["direct"]["first_median"], by["driver"]["first_median"], wins,
                           len(by["direct"]["medians"])) + first + (by["kept"]["first_median"],
                          by["direct"]["start_median"], by["driver"]["start_median"]) + start
                          + (by["direct"]["cpu"], by["driver"]["cpu"]) + cpu))
        if by["kept"]["compiled"]:
            summary.append("%d scripts: the kept run compiled %d times (expected none)"
                           % (count, by["kept"]["compiled"]))
        left += by["direct"]["left"] + by["driver"]["left"] + by["kept"]["left"]
    print("\nSUMMARY lean (direct vs driver, medians of %d repeats): %s%s" % (
        args.repeat, "; ".join(summary), "; children left behind: %s" % left if left else ""))
    return 0 if not left else 1


if __name__ == "__main__":
    C.main_wrapper(main)
