"""stap-exporter: serve SystemTap scripts' Prometheus metrics over HTTP.

Owns gevent's monkey-patching, done first; must not contain logic.
"""

import sys
import types

from gevent import monkey

# gevent before 23.7 (Debian 12's) looks its plugins up with pkg_resources,
# whose import reads every installed distribution's metadata and keeps some
# 6 MiB resident for good.  The exporter uses no gevent plugin (the one gevent
# ships only warns when signal is patched without os), so while patching the
# look-up finds none.  From 23.7 on, gevent uses importlib.metadata instead
# and this changes nothing.
_NO_PLUGINS = types.ModuleType("pkg_resources")
_NO_PLUGINS.iter_entry_points = lambda group, name=None: iter(())
sys.modules.setdefault("pkg_resources", _NO_PLUGINS)
# gevent must patch the standard library before anything else imports it.
# Not ssl (TLS uses gevent.ssl itself, and only with --web-config) nor the
# resolver (names are resolved once, at start-up): each costs resident memory
# every exporter would carry.
monkey.patch_all(ssl=False, dns=False)
if sys.modules["pkg_resources"] is _NO_PLUGINS:
    del sys.modules["pkg_resources"]

import gevent  # noqa: E402

# The hub names the greenlet or watcher an uncaught error came from with
# this; gevent's default, pprint.saferepr, differs from repr() only for plain
# containers, and would load pprint and dataclasses for it.
gevent.config.format_context = "builtins.repr"

from stapexporter_lib.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
