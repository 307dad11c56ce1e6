"""Blocking calls away from the hub.

``in_pool`` runs a function in the hub's thread pool and raises its
exception in the calling greenlet.  The pool itself would also print a
traceback for every exception a task raises, and the exporter prints none
for errors it expects (a file that went away, a directory it may not
remove): the exception is caught in the worker thread and handed back.

Owns that hand-over.  Must not decide what runs there or what an error
means (the callers do).
"""

from typing import Any, Callable

import gevent


def in_pool(func: Callable[..., Any], *args: Any) -> Any:
    """FUNC(*ARGS) in the hub's thread pool; its exception is raised here."""
    def call():
        try:
            return False, func(*args)
        except Exception as exc:  # noqa: BLE001 -- handed back to the caller
            return True, exc
    failed, value = gevent.get_hub().threadpool.apply(call)
    if failed:
        raise value
    return value
