#!/usr/bin/env python3
"""Soak: several clients scrape for a while (default 10 minutes) while a short
keepalive (``-k 1``) keeps stopping and restarting the scripts.  Reports the
exporter's open file descriptors and RSS before and after (both measured with
every script stopped), the status counts, the number of starts, and asserts
that no child is left behind at the end (no process whose command line holds
``stapexp_<exporterpid>_``), nor any working or module directory.

    python3 bench/soak.py                 # 10 minutes
    python3 bench/soak.py --minutes 2 --clients 8
"""

import argparse
import collections
import glob
import http.client
import os
import random
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SCRIPTS = [("fifo_a.stp", "mode=fifo lines=50"), ("fifo_b.stp", "mode=fifo lines=200"),
           ("fifo_c.stp", "mode=fifo lines=10 pad=20000"), ("file_a.stp", "mode=file lines=50"),
           ("file_b.stp", "mode=file lines=200"), ("file_c.stp", "mode=file lines=10 pad=20000")]


def wait_all_stopped(exp, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = exp.index_states()
        if states and all(s == "stopped" for s in states.values()):
            return True
        time.sleep(0.2)
    return False


def starts_total(exp):
    _, _, body = exp.get("/")
    total = 0
    for line in body.decode("utf-8", "replace").splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 5 and parts[4].isdigit():
            total += int(parts[4])
    return total


def client(exp, stop, counts, lock, seed):
    rnd = random.Random(seed)
    names = [n for n, _ in SCRIPTS]
    local = collections.Counter()
    while not stop.is_set():
        name = rnd.choice(names)
        conn = http.client.HTTPConnection(C.HOST, exp.port, timeout=15)
        try:
            for _ in range(rnd.randint(1, 20)):
                if stop.is_set():
                    break
                hdrs = {"Accept-Encoding": "gzip"} if rnd.random() < 0.3 else {}
                conn.request("GET", "/" + name, headers=hdrs)
                r = conn.getresponse()
                r.read()
                local[r.status] += 1
                if r.getheader("connection", "").lower() == "close":
                    break
                stop.wait(rnd.uniform(0, 0.05))
        except (OSError, http.client.HTTPException) as exc:
            local["error:" + type(exc).__name__] += 1
        finally:
            conn.close()
        # Pauses long enough (sometimes) for the 1 s keepalive to stop scripts.
        stop.wait(rnd.uniform(0, 2.5))
    with lock:
        counts.update(local)


def main():
    ap = argparse.ArgumentParser(description="stap-exporter soak test")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--sample", type=float, default=15.0, help="seconds between samples")
    args = ap.parse_args()
    print("soak: %s; %g min, %d clients, %d scripts, -k 1"
          % (C.machine_line(), args.minutes, args.clients, len(SCRIPTS)))

    tmp = C.make_tempdir()
    scripts, procfs = os.path.join(tmp, "scripts"), os.path.join(tmp, "procfs")
    os.makedirs(scripts)
    os.makedirs(procfs)
    for name, directives in SCRIPTS:
        C.write_script(scripts, name, directives)
    exp = C.Exporter(scripts, procfs, args=["-k", "1"])
    pid = exp.pid
    # Warm up: every script once, then all stopped again.
    for name, _ in SCRIPTS:
        exp.get_until("/" + name)
    if not wait_all_stopped(exp):
        print("error: scripts did not stop after the warm-up")
        return 1
    fds0, rss0 = C.open_fds(pid), C.rss_kib(pid) / 1024
    starts0 = starts_total(exp)
    print("before: %d fds, RSS %.1f MiB (all scripts stopped)" % (fds0, rss0))

    stop = threading.Event()
    counts = collections.Counter()
    lock = threading.Lock()
    threads = [threading.Thread(target=client, args=(exp, stop, counts, lock, i), daemon=True)
               for i in range(args.clients)]
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    for t in threads:
        t.start()
    samples = []
    try:
        while time.monotonic() < end:
            time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
            s = (time.monotonic() - t0, C.open_fds(pid), C.rss_kib(pid) / 1024,
                 len(exp.children()), C.cpu_seconds(pid))
            samples.append(s)
            print("  t=%5.0fs  fds %4d  RSS %6.1f MiB  children %3d  cpu %.1f s"
                  % s, flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    elapsed = time.monotonic() - t0
    if not wait_all_stopped(exp):
        print("warning: scripts still not stopped 60 s after the load ended")
    time.sleep(0.5)
    fds1, rss1 = C.open_fds(pid), C.rss_kib(pid) / 1024
    starts = starts_total(exp) - starts0
    print("after:  %d fds, RSS %.1f MiB (all scripts stopped)" % (fds1, rss1))

    workdir_glob = os.path.join(tempfile.gettempdir(), "stap-exporter.%d.*" % pid)
    left = exp.stop()
    left_dirs = glob.glob(workdir_glob) + [d for d in glob.glob(os.path.join(procfs, "*"))]

    total = sum(v for k, v in counts.items())
    ok = counts.get(200, 0)
    rows = [[str(k), v, "%.2f%%" % (100.0 * v / total if total else 0)]
            for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))]
    print()
    print(C.table(["status", "count", "share"], rows))
    print()
    print(C.table(["", "fds", "RSS MiB"], [["before", fds0, "%.1f" % rss0],
                                          ["after", fds1, "%.1f" % rss1],
                                          ["max during", max([s[1] for s in samples] or [0]),
                                           "%.1f" % max([s[2] for s in samples] or [0])]]))
    bad = [k for k in counts if k not in (200, 503)]
    problems = []
    if left:
        problems.append("children left behind: %s" % left)
    if left_dirs:
        problems.append("directories left behind: %s" % left_dirs)
    if fds1 > fds0 + 2:
        problems.append("fd growth %d -> %d" % (fds0, fds1))
    if bad:
        problems.append("unexpected outcomes: %s" % ", ".join("%s x%d" % (k, counts[k])
                                                            for k in bad))
    print("\nSUMMARY soak: %.1f min, %d requests (%.0f/s), %.1f%% 200, %d script starts;"
          " fds %d -> %d, RSS %.1f -> %.1f MiB; children left behind: %s; %s" % (
              elapsed / 60, total, total / elapsed if elapsed else 0,
              100.0 * ok / total if total else 0, starts, fds0, fds1, rss0, rss1,
              len(left), "OK" if not problems else "PROBLEMS: " + "; ".join(problems)))
    assert not left, "children left behind: %s" % left
    return 0 if not problems else 1


if __name__ == "__main__":
    C.main_wrapper(main)
