"""stap-exporter: serve SystemTap scripts' Prometheus metrics over HTTP.

Owns gevent's monkey-patching, done first; must not contain logic.
"""

# gevent must patch the standard library before anything else imports it.
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from stapexporter_lib.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
