"""stap-exporter: serve SystemTap scripts' Prometheus metrics over HTTP.

Owns gevent's monkey-patching, done first; must not contain logic.
"""

# gevent must patch the standard library before anything else imports it.
# Not ssl (TLS uses gevent.ssl itself, and only with --web-config) nor the
# resolver (names are resolved once, at start-up): each costs resident memory
# every exporter would carry.
from gevent import monkey

monkey.patch_all(ssl=False, dns=False)

import sys  # noqa: E402

from stapexporter_lib.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
