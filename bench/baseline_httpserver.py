#!/usr/bin/env python3
"""Baseline: a single-threaded ``http.server`` relay, built the way the
original stap-exporter was -- one ``HTTPServer`` (no threads), HTTP/1.0
(connection closed after each response), reading the output file afresh on
every request.

    baseline_httpserver.py --port PORT --file PATH [--host 127.0.0.1]

Serves the bytes of PATH at every GET path.  It only listens on loopback
unless told otherwise.  ``scrape.py`` starts and stops it itself.
"""

import argparse
import http.server
import signal
import sys


def make_handler(path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except OSError as exc:
                self.send_error(503, str(exc))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--backlog", type=int, default=128,
                    help="listen backlog (http.server's default is 5; 128 avoids"
                         " measuring SYN drops instead of the relay)")
    args = ap.parse_args()

    class Server(http.server.HTTPServer):
        request_queue_size = args.backlog

    server = Server((args.host, args.port), make_handler(args.file))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
