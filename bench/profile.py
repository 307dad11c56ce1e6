#!/usr/bin/env python3
"""Profile the exporter's hot path with py-spy (``pip install py-spy``) while
wrk (or the Python client) scrapes a ~7 KiB (200-line) script with 64
keep-alive clients.  Prints the top functions by own ("self") samples and by
inclusive samples, and keeps the collapsed stacks (and an SVG flame graph
with ``--svg``).

    python3 bench/profile.py                     # 64 clients, regular file, 10 s
    python3 bench/profile.py --mode fifo --gzip --duration 15 --svg /tmp/prof.svg
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def short(frame):
    """'func (path/file.py:LINE)' -> 'func (file.py)'."""
    if " (" in frame:
        func, where = frame.split(" (", 1)
        path = where.rstrip(")").rsplit(":", 1)[0]
        return "%s (%s)" % (func, _shorten(path))
    return frame


def _shorten(path):
    for marker in ("site-packages/", "lib/python3", "stapexporter_lib/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            if marker == "lib/python3":
                tail = "stdlib/" + tail.split("/", 1)[1]
            elif marker == "stapexporter_lib/":
                tail = "stapexporter_lib/" + tail
            return tail
    return os.path.basename(path)


def main():
    ap = argparse.ArgumentParser(description="profile stap-exporter under scrape load")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--mode", choices=("file", "fifo"), default="file")
    ap.add_argument("--gzip", action="store_true")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--raw", default="/tmp/stapexp-profile.txt", help="collapsed stacks")
    ap.add_argument("--svg", help="also write a flame graph here")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy not found: pip install py-spy")
        return 2

    tmp = C.make_tempdir()
    scripts, procfs = os.path.join(tmp, "scripts"), os.path.join(tmp, "procfs")
    os.makedirs(scripts)
    os.makedirs(procfs)
    C.write_script(scripts, "t.stp", "mode=%s lines=200" % args.mode)
    exp = C.Exporter(scripts, procfs)
    exp.get_until("/t.stp")
    headers = {"Accept-Encoding": "gzip"} if args.gzip else None
    load = C.LoadProcess(exp.url + "/t.stp", args.clients, args.duration + 2, headers=headers)
    time.sleep(1)
    cmd = ["py-spy", "record", "--pid", str(exp.pid), "--duration", str(args.duration),
           "--rate", str(args.rate), "--format", "raw", "-o", args.raw, "--nonblocking"]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    if args.svg:
        # A second, shorter capture for the picture.
        subprocess.run(["py-spy", "record", "--pid", str(exp.pid), "--duration", "1",
                        "--rate", str(args.rate), "-o", args.svg, "--nonblocking"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = load.join(args.duration + 60)
    exp.stop()

    own = collections.Counter()
    incl = collections.Counter()
    total = 0
    with open(args.raw) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            n = int(n)
            frames = [short(fr) for fr in stack.split(";")]
            # py-spy puts the thread as the first frame ("process ..."/"thread ...").
            frames = [fr for fr in frames if not fr.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += n
            own[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    print("load during the profile: %.0f req/s, p99 %s ms (%s clients, %s, gzip %s)"
          % (r.rps, C.ms(r.p99), args.clients, args.mode, "on" if args.gzip else "off"))
    print("%d samples at %d Hz (py-spy --nonblocking; idle samples excluded)\n"
          % (total, args.rate))
    print(C.table(["#", "self %", "function"],
                  [[i + 1, "%.1f" % (100.0 * n / total), fr]
                   for i, (fr, n) in enumerate(own.most_common(args.top))]))
    print()
    print(C.table(["#", "incl %", "function"],
                  [[i + 1, "%.1f" % (100.0 * n / total), fr]
                   for i, (fr, n) in enumerate(incl.most_common(args.top + 10))]))
    print("\nSUMMARY profile: top self: %s" % ", ".join(
        "%s %.0f%%" % (fr, 100.0 * n / total) for fr, n in own.most_common(5)))
    return 0


if __name__ == "__main__":
    C.main_wrapper(main)
